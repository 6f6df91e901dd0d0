"""Model engines behind the policy-server and the reward-scorer (no gRPC here).

An engine wraps one immutable model version from the registry. It is called from a single model
thread; a new version is loaded into a new engine beside the old one and swapped in, so calls in
flight finish on the version they started with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rlhf.errors import DataError
from rlhf.generation import SamplingParams, sample, tokenize_prompts
from rlhf.inference.guided import Guide
from rlhf.models import RewardModel, context_length, load_causal_lm, load_tokenizer


@dataclass(frozen=True)
class GenerationRequest:
    """What one generation request asks for: the serving side's one sampling-settings type
    (training samples with :class:`rlhf.generation.SamplingParams`, which :meth:`sampling_params`
    gives). Hashable: equal requests can share a batch. Every API surface builds it through
    :func:`rlhf.inference.requests.build_request`, which checks it."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    return_logprobs: bool = False
    top_logprobs: int = 0  # alternatives reported per token by rlhf.inference (0: none)
    fit_to_context: bool = False  # max_new_tokens was a default: lower it to the room the prompt leaves
    # "model": each token's log-prob under the model's own distribution (temperature 1, no
    # filter), as inference APIs report it; "sampling": under the distribution it was drawn
    # from (temperature, top-k/top-p, min_new_tokens' EOS block; 0 when greedy) -- what PPO
    # needs as behaviour log-probs (rlhf.algos.ppo.PPOTrainer.step_on_rollout)
    logprobs_of: str = "model"
    # rlhf.inference only (rlhf.inference.sampling says how each applies):
    repetition_penalty: float = 1.0  # > 1 discourages every token of the prompt and the sample so far
    frequency_penalty: float = 0.0  # subtracted from a token's logit per earlier occurrence in the sample
    presence_penalty: float = 0.0  # subtracted from a token's logit once it occurred in the sample
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest one
    stop_token_ids: tuple[int, ...] = ()  # these tokens end a sample (as end-of-sequence does)
    ignore_eos: bool = False  # never choose the end-of-sequence token: run to max_new_tokens
    guide: Guide | None = None  # structured output: what the sample must match
    prompt_logprobs: bool = False  # also score the prompt: each token's log-prob given those before it

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, min_new_tokens=self.min_new_tokens)


@dataclass
class Sample:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" | "length"


@dataclass
class PromptResult:
    prompt_token_ids: list[int]
    samples: list[Sample]


def _read_manifest(path: Path) -> dict:
    f = path / "manifest.json"
    return json.loads(f.read_text()) if f.is_file() else {}


class PolicyEngine:
    def __init__(self, path: str | Path, version: str, *, max_prompt_tokens: int = 512, device: str = "cpu"):
        self.path = Path(path)
        self.version = version
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_causal_lm(self.path).to(self.device).eval()
        cfg = _read_manifest(self.path).get("config", {})
        self.add_bos = bool(cfg.get("add_bos", False))
        self.context_length = context_length(self.model.config) or 2048
        self.max_prompt_tokens = min(max_prompt_tokens, self.context_length - 1)

    def count_prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + int(self.add_bos)

    def check(self, prompts: list[str], req: GenerationRequest) -> None:
        """Reject what cannot be served (DataError names the prompt index)."""
        for i, p in enumerate(prompts):
            n = self.count_prompt_tokens(p)
            if n > self.max_prompt_tokens:
                raise DataError(f"prompts[{i}] has {n} tokens; the limit is {self.max_prompt_tokens}")
            if n + req.max_new_tokens > self.context_length:
                raise DataError(f"prompts[{i}]: {n} prompt tokens + max_new_tokens={req.max_new_tokens} "
                                f"exceed the model's context of {self.context_length}")

    def _finish(self, ids: list[int], lps: list[float], stop: tuple[str, ...], ended_eos: bool) -> Sample:
        eos = self.tokenizer.eos_token_id
        if ended_eos and ids and ids[-1] == eos:
            text_ids, reason = ids[:-1], "stop"
        else:
            text_ids, reason = ids, "length"
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        if stop:
            hits = [(text.find(s), s) for s in stop if s and text.find(s) >= 0]
            if hits:
                cut = min(h[0] for h in hits)
                # keep the tokens up to the one that completes the first stop string
                k = len(text_ids)
                for j in range(1, len(text_ids) + 1):
                    if len(self.tokenizer.decode(text_ids[:j], skip_special_tokens=True)) > cut:
                        k = j
                        break
                text, ids, lps, reason = text[:cut], text_ids[:k], lps[:k], "stop"
        return Sample(text=text, token_ids=list(ids), logprobs=list(lps), finish_reason=reason)

    @torch.no_grad()
    def generate(self, prompts: list[str], req: GenerationRequest,
                 on_step: Callable[[torch.Tensor, torch.Tensor], bool | None] | None = None) -> list[PromptResult]:
        n = max(1, req.n)
        rows = [p for p in prompts for _ in range(n)]
        ids, mask = tokenize_prompts(self.tokenizer, rows, self.max_prompt_tokens, self.device, add_bos=self.add_bos)
        params = req.sampling_params()
        gen = torch.Generator(device="cpu").manual_seed(req.seed) if req.seed is not None else None
        r = sample(self.model, ids, mask, params, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                   generator=gen, on_step=on_step, logprobs=req.logprobs_of)
        out: list[PromptResult] = []
        resp, rmask, lp = r.response_ids.tolist(), r.response_mask.tolist(), r.logprobs.tolist()
        for i in range(len(prompts)):
            p_ids = [t for t, m in zip(ids[i * n].tolist(), mask[i * n].tolist()) if m]
            samples = []
            for j in range(i * n, (i + 1) * n):
                keep = [k for k, m in enumerate(rmask[j]) if m]
                s = self._finish([resp[j][k] for k in keep], [lp[j][k] for k in keep], req.stop,
                                 bool(r.ended_with_eos[j]))
                samples.append(s)
            out.append(PromptResult(p_ids, samples))
        return out


class RewardEngine:
    """A reward model behind a server. ``forward_batch`` caps the pairs per forward pass: a
    server packs many callers' pairs into one call, and on a CPU large padded batches are slower
    per pair than small ones (bench/services.py measures it), so a call runs in forward passes of
    at most that many pairs, grouped by length so that little padding is computed."""

    def __init__(self, path: str | Path, version: str, *, max_length: int = 512, device: str = "cpu",
                 forward_batch: int | None = None):
        if forward_batch is not None and forward_batch < 1:
            raise ValueError(f"forward_batch must be >= 1, got {forward_batch}")
        self.path = Path(path)
        self.version = version
        self.max_length = max_length
        self.forward_batch = forward_batch
        self.model = RewardModel.load(self.path).to(torch.device(device)).eval()

    @torch.no_grad()
    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        size = self.forward_batch or len(pairs)
        if size >= len(pairs):
            return self.model.score([p for p, _ in pairs], [r for _, r in pairs], batch_size=len(pairs)).tolist()
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        scores = self.model.score([pairs[i][0] for i in order], [pairs[i][1] for i in order], batch_size=size).tolist()
        out = [0.0] * len(pairs)
        for i, s_ in zip(order, scores):
            out[i] = s_
        return out
