"""Structured output: samples constrained to a JSON schema, any JSON object, a regular expression
or a choice among strings, with xgrammar.

xgrammar was chosen over llguidance and outlines-core by the overhead it adds per generated token
(bench/structured_output.py; docs/benchmarks.md, "Structured output"). A :class:`Guide` is part
of a :class:`~rlhf.serving.GenerationRequest`; the engine compiles it once per distinct guide
(:class:`Grammars`, an LRU cache per model version), gives each constrained row its own matcher,
and at every step masks the tokens its matcher does not allow (:func:`mask_rows`) before the
sampler chooses, then advances the matchers by the chosen tokens. Once the grammar is complete,
only the end-of-sequence token is allowed, so a sample that ends by itself (not by
``max_new_tokens``) always parses. Log-probs stay the policy's own, as with the other sampling
settings.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from rlhf.errors import DataError

KINDS = ("json_schema", "json_object", "regex", "choice")


@dataclass(frozen=True)
class Guide:
    """What a constrained sample must match. ``spec``: the JSON schema's text (json_schema), the
    regular expression (regex), the choices as a JSON list (choice), "" (json_object)."""

    kind: str
    spec: str = ""

    @staticmethod
    def choice(options: list[str]) -> "Guide":
        return Guide("choice", json.dumps(list(options)))

    def regex(self) -> str:
        """The regular expression of a regex or choice guide."""
        if self.kind == "choice":
            return "(" + "|".join(re.escape(c) for c in json.loads(self.spec)) + ")"
        return self.spec


class Grammars:
    """Compiles guides for one tokenizer (one model version), with an LRU cache; thread-safe.

    ``vocab_size`` is the width of the model's logits (it may exceed the tokenizer's vocabulary).
    The tokenizer's description is built at the first guide, so versions never asked for
    structured output do not pay for it.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_id: int, cache_size: int = 64):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.cache_size = cache_size
        self._compiler = None
        self._cache: OrderedDict[Guide, object] = OrderedDict()
        self._lock = threading.Lock()

    def _get_compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=[self.eos_id])
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compile(self, guide: Guide):
        """The compiled grammar of ``guide``; DataError when the schema or regex is not valid."""
        with self._lock:
            hit = self._cache.get(guide)
            if hit is not None:
                self._cache.move_to_end(guide)
                return hit
            compiler = self._get_compiler()
        try:
            if guide.kind == "json_schema":
                compiled = compiler.compile_json_schema(guide.spec, any_whitespace=False)
            elif guide.kind == "json_object":
                compiled = compiler.compile_builtin_json_grammar()
            elif guide.kind in ("regex", "choice"):
                compiled = compiler.compile_regex(guide.regex())
            else:
                raise DataError(f"unknown structured output kind {guide.kind!r}; one of {', '.join(KINDS)}")
        except RuntimeError as e:  # xgrammar's parse errors: "[time] file:line: what"
            what = str(e).strip().splitlines()[0]
            what = what.split(": ", 1)[-1] if "] " in what else what
            raise DataError(f"the {guide.kind.replace('_', ' ')} cannot be used for structured output: {what}") from None
        with self._lock:
            self._cache[guide] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def matcher(compiled):
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)


def mask_rows(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """Set to -inf, in ``logits`` (n, V), every token the matcher of each row in ``rows`` does not
    allow next (``matchers[i]`` belongs to ``rows[i]``)."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])  # (n, ceil(V / 32)) int32
    for r, m in zip(rows, matchers):
        m.fill_next_token_bitmask(bitmask, r)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
