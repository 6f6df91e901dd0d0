"""Two PPO steps on fixed rollouts, in one process or as one rank of several (torchrun): what
tests/algos/test_ppo_distributed.py compares. Not a test module itself.

    torchrun --nproc-per-node 2 tests/algos/ppo_world.py OUT_DIR

Every rank builds the same tiny policy and samples the same 8 rollouts per step from it (one
seeded generator), then takes its share of the rows (rank r: rows r, r + W, ...), as each rank of a
real run samples its own share. Rank 0 writes ``OUT_DIR/result.json`` (each step's metrics, the
whitening of a fixed tensor) and ``OUT_DIR/weights.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, str(ROOT))

from rlhf import distributed  # noqa: E402
from rlhf.algos.masked import whiten  # noqa: E402
from rlhf.algos.ppo import PPOConfig, PPOTrainer  # noqa: E402
from rlhf.generation import SamplingParams, sample, tokenize_prompts  # noqa: E402
from rlhf.models import TinyLMConfig, build_tiny_lm, train_tokenizer  # noqa: E402

TEXTS = [f"review {i}: the film was good and fun, not bad" for i in range(40)]
PROMPTS = [f"review {i}: the film" for i in range(8)]
KEYS = ("kl", "kl_coef", "kl_coef_next", "reward", "reward_std", "reward_total", "policy_loss", "value_loss",
        "entropy", "approx_kl", "clipfrac_ratio", "ptx_loss", "samples_total", "tokens_total", "response_length_tokens")


def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """A reward that depends on the text alone (the same on every rank)."""
    return torch.tensor([(len(r) % 7) / 3.0 - 1.0 + 0.1 * r.count(" ") for r in responses])


def run(out: Path, world: distributed.World) -> dict:
    torch.manual_seed(0)
    tok = train_tokenizer(TEXTS, vocab_size=300)
    policy = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)), seed=0)
    cfg = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=2, lr=3e-3, kl_coef=0.2, kl_target=0.5,
                    sampling=SamplingParams(max_new_tokens=6), ptx_coef=0.5, ptx_batch_size=4)
    ptx = torch.randint(1, len(tok), (16, 12), generator=torch.Generator().manual_seed(3))
    ref = build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)), seed=1)
    trainer = PPOTrainer(policy, tok, score, cfg, ref_model=ref, ptx_blocks=ptx, world=world)
    # the whole batch of each step, sampled once from the starting policy with one generator
    gen = torch.Generator().manual_seed(11)
    ids, mask = tokenize_prompts(tok, PROMPTS, cfg.max_prompt_tokens, torch.device("cpu"), add_bos=True)
    rollouts = [sample(policy, ids, mask, cfg.sampling, tok.eos_token_id, tok.pad_token_id, generator=gen)
                for _ in range(2)]
    steps = []
    for r in rollouts:
        rows = world.share(list(range(len(PROMPTS))))
        part = type(r)(*(t[rows] if t is not None else None for t in (
            r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.logprobs, r.values, r.ended_with_eos)))
        m = trainer.step_on_rollout([PROMPTS[i] for i in rows], part, own_rollout=False)
        steps.append({k: float(m[k]) for k in KEYS})
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(5))
    xm = (torch.rand(8, 5, generator=torch.Generator().manual_seed(6)) > 0.3).float()
    rows = world.share(list(range(8)))
    whitened = world.gather(whiten(x[rows], xm[rows], world=world))
    result = {"steps": steps, "whitened": [row.tolist() for part in zip(*whitened) for row in part],
              "whitened_alone": whiten(x, xm).tolist()}
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result))
        torch.save({k: v.detach().clone() for k, v in trainer.modules().state_dict().items()}, out / "weights.pt")
    return result


if __name__ == "__main__":
    w = distributed.setup("cpu")
    try:
        run(Path(sys.argv[1]), w)
    finally:
        distributed.shutdown()
