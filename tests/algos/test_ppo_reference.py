"""One whole PPO update of PPOTrainer on a fixed batch against a plain, loop-written reference
implementation of the same equations (seed 002: the KL-penalised reward; GAE; whitening; the
clipped surrogate and value losses; the entropy bonus; PPO-ptx; gradient clipping; Adam).

The reference runs every row on its own, unpadded, and every token in a Python loop; it shares
no code with rlhf.algos.ppo, only the models' forward passes and autograd. The trainer's new
weights must equal the reference's.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rlhf.algos.ppo import PPOConfig, PPOTrainer
from rlhf.algos.sft import PretrainBlocks, pack_texts
from rlhf.generation import Rollout, SamplingParams
from tests.algos.test_ppo_math import TEXTS, _perturbed, _tiny_lm, tok  # noqa: F401 - tok is a fixture

torch.set_num_threads(1)

PROMPT_LENS = [3, 5, 2, 4]
RESP_LENS = [5, 3, 5, 4]  # rows 1 and 3 end with EOS (their last token), the others run to max_new_tokens
SCORES = [1.5, -0.5, 0.25, 2.0]


def _batch(tok, seed=0):
    """A fixed batch: left-padded prompts, right-padded responses, EOS never inside min_new_tokens."""
    g = torch.Generator().manual_seed(seed)
    eos, pad, V = tok.eos_token_id, tok.pad_token_id, len(tok)
    P, R = max(PROMPT_LENS), max(RESP_LENS)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in PROMPT_LENS]
    resps = []
    for n in RESP_LENS:
        row = torch.randint(1, V, (n,), generator=g).tolist()
        if n < R:
            row[-1] = eos
        resps.append(row)
    r = Rollout(
        prompt_ids=torch.tensor([[pad] * (P - len(p)) + p for p in prompts]),
        prompt_mask=torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts]),
        response_ids=torch.tensor([x + [pad] * (R - len(x)) for x in resps]),
        response_mask=torch.tensor([[1] * len(x) + [0] * (R - len(x)) for x in resps]),
        logprobs=torch.zeros(len(resps), R),
        values=None,
        ended_with_eos=torch.tensor([len(x) < R for x in resps]),
    )
    return prompts, resps, r


# ----------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------


def ref_token_logprobs(z, t, cfg, eos):
    """(V,) log-probs of the sampled distribution at response position t: softmax(z / T), EOS
    removed (the rest renormalised by 1 - p_eos) while t < min_new_tokens. Returns (lp, keep)."""
    lp = torch.log_softmax(z.float() / cfg.sampling.temperature, -1)
    keep = torch.ones_like(lp, dtype=torch.bool)
    if t < cfg.sampling.min_new_tokens:
        keep[eos] = False
        lp = lp - torch.log1p(-lp[eos].exp())
    return lp, keep


def ref_forward(policy, critic, value_head, prompt, resp, cfg, eos):
    """Per-token log-probs, entropies and values of one unpadded row."""
    out = policy(input_ids=torch.tensor([prompt + resp]), output_hidden_states=True)
    P = len(prompt)
    hidden = out.hidden_states[-1][0] if critic is None else critic(input_ids=torch.tensor([prompt + resp])).last_hidden_state[0]
    lps, ents, vals = [], [], []
    for t, y in enumerate(resp):
        lp, keep = ref_token_logprobs(out.logits[0, P - 1 + t], t, cfg, eos)
        lps.append(lp[y])
        ents.append(-(lp[keep].exp() * lp[keep]).sum())
        vals.append(value_head(hidden[P - 1 + t].float()).squeeze())
    return lps, ents, vals


def ref_ppo_update(policy, critic, value_head, ref, prompts, resps, scores, blocks, cfg, eos, gen,
                   behaviour=None):
    B = len(prompts)
    # rollout statistics with the weights before the update
    with torch.no_grad():
        old_lp, old_v, ref_lp = [], [], []
        for p, y in zip(prompts, resps):
            lps, _, vals = ref_forward(policy, critic, value_head, p, y, cfg, eos)
            old_lp.append([float(x) for x in lps])
            old_v.append([float(x) for x in vals])
            ref_out = ref(input_ids=torch.tensor([p + y])).logits[0]
            ref_lp.append([float(ref_token_logprobs(ref_out[len(p) - 1 + t], t, cfg, eos)[0][tok_])
                           for t, tok_ in enumerate(y)])
    # the ratio's denominator: the behaviour log-probs when given, else the current ones
    ratio_lp = behaviour if behaviour is not None else old_lp
    beta = cfg.kl_coef
    # per-token rewards: -beta (log pi - log rho), plus the score at the last token (KL: current weights)
    rewards = [[-beta * (old_lp[b][t] - ref_lp[b][t]) for t in range(len(resps[b]))] for b in range(B)]
    for b in range(B):
        rewards[b][-1] += scores[b]
    # GAE
    adv, ret = [], []
    for b in range(B):
        n = len(resps[b])
        a_b, g_b, last = [0.0] * n, [0.0] * n, 0.0
        for t in reversed(range(n)):
            v_next = old_v[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + cfg.gamma * v_next - old_v[b][t]
            last = delta + cfg.gamma * cfg.lam * last
            a_b[t], g_b[t] = last, last + old_v[b][t]
        adv.append(a_b), ret.append(g_b)
    # whitening over every real token of the batch (unbiased variance)
    flat = [a for row in adv for a in row]
    mean = sum(flat) / len(flat)
    var = sum((a - mean) ** 2 for a in flat) / (len(flat) - 1)
    adv = [[(a - mean) / math.sqrt(var + 1e-8) for a in row] for row in adv]

    params = {id(p): p for p in list(policy.parameters()) + list(value_head.parameters())
              + (list(critic.parameters()) if critic is not None else [])}
    value_ids = {id(p) for p in value_head.parameters()} | ({id(p) for p in critic.parameters()} if critic else set())
    adam = {k: (torch.zeros_like(p), torch.zeros_like(p)) for k, p in params.items()}
    step = 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=gen).tolist()
        for i in range(0, B, cfg.mini_batch_size):
            rows = perm[i : i + cfg.mini_batch_size]
            pg_sum, vf_sum, ent_sum, n = 0.0, 0.0, 0.0, 0
            for b in rows:
                lps, ents, vals = ref_forward(policy, critic, value_head, prompts[b], resps[b], cfg, eos)
                for t in range(len(resps[b])):
                    ratio = torch.exp(lps[t] - ratio_lp[b][t])
                    A = adv[b][t]
                    pg_sum = pg_sum + torch.max(-A * ratio, -A * torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range))
                    v_clip = old_v[b][t] + torch.clamp(vals[t] - old_v[b][t], -cfg.clip_range_value, cfg.clip_range_value)
                    vf_sum = vf_sum + torch.max((vals[t] - ret[b][t]) ** 2, (v_clip - ret[b][t]) ** 2)
                    ent_sum = ent_sum + ents[t]
                    n += 1
            loss = pg_sum / n + cfg.vf_coef * 0.5 * vf_sum / n - cfg.entropy_coef * ent_sum / n
            if cfg.ptx_coef > 0:
                idx = torch.randint(0, blocks.shape[0], (cfg.ptx_batch_size,), generator=gen).tolist()
                nll, m = 0.0, 0
                for j in idx:
                    x = blocks[j].tolist()
                    z = policy(input_ids=torch.tensor([x])).logits[0]
                    for t in range(len(x) - 1):
                        nll = nll - torch.log_softmax(z[t].float(), -1)[x[t + 1]]
                        m += 1
                loss = loss + cfg.ptx_coef * nll / m
            for p in params.values():
                p.grad = None
            loss.backward()
            # clip the global gradient norm
            total = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params.values() if p.grad is not None))
            coef = min(1.0, cfg.max_grad_norm / (total + 1e-6))
            # Adam (betas 0.9, 0.999; eps 1e-5), the value group at its own learning rate
            step += 1
            with torch.no_grad():
                for k, p in params.items():
                    if p.grad is None:
                        continue
                    g = p.grad * coef
                    m1, m2 = adam[k]
                    m1.mul_(0.9).add_(0.1 * g)
                    m2.mul_(0.999).add_(0.001 * g * g)
                    lr = cfg.value_lr if k in value_ids else cfg.lr
                    m_hat, v_hat = m1 / (1 - 0.9 ** step), m2 / (1 - 0.999 ** step)
                    p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-5))


# ----------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_model, behaviour", [("shared", False), ("separate", False), ("shared", True)])
def test_one_ppo_update_equals_the_loop_written_reference(tok, value_model, behaviour):  # noqa: F811
    torch.manual_seed(0)
    policy = _tiny_lm(tok)
    with torch.no_grad():
        policy.get_output_embeddings().weight.mul_(4.0)
    ref = _perturbed(policy)
    cfg = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, lr=3e-3, value_lr=1e-2, kl_coef=0.3,
                    adaptive_kl=False, kl_target=None, clip_range=0.2, clip_range_value=0.2, vf_coef=0.5,
                    entropy_coef=0.05, gamma=0.9, lam=0.8, max_grad_norm=0.5, ptx_coef=0.7, ptx_batch_size=2,
                    value_model=value_model, sampling=SamplingParams(max_new_tokens=5, temperature=0.8, min_new_tokens=2))
    blocks = pack_texts(tok, TEXTS, 8)
    trainer = PPOTrainer(policy, tok, lambda ps, rs: torch.tensor([SCORES[int(p)] for p in ps]), cfg, ref_model=ref,
                         ptx_blocks=PretrainBlocks(blocks))
    # the reference starts from copies of the same weights, with the trainer's random state
    r_policy, r_head = copy.deepcopy(trainer.policy), copy.deepcopy(trainer.value_head)
    r_critic = copy.deepcopy(trainer.critic)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(trainer.update_gen.get_state())

    prompts, resps, r = _batch(tok)
    stale = None
    if behaviour:  # behaviour log-probs of "another version": the current ones, shifted per token
        shift = torch.linspace(-0.3, 0.3, r.response_ids.numel()).view_as(r.logprobs)
        with torch.no_grad():
            cur = [ref_forward(trainer.policy, None, trainer.value_head, p, y, cfg, tok.eos_token_id)[0]
                   for p, y in zip(prompts, resps)]
        stale = [[float(cur[b][t]) + float(shift[b, t]) for t in range(len(resps[b]))] for b in range(4)]
        r.logprobs = torch.tensor([row + [0.0] * (5 - len(row)) for row in stale])
    m = trainer.step_on_rollout([str(i) for i in range(4)], r, behaviour_logprobs=behaviour)
    assert m["reward"] == pytest.approx(sum(SCORES) / 4)
    ref_ppo_update(r_policy, r_critic, r_head, ref, prompts, resps, SCORES, blocks, cfg, tok.eos_token_id, gen, stale)

    pairs = [(trainer.policy, r_policy), (trainer.value_head, r_head)]
    if value_model == "separate":
        pairs.append((trainer.critic, r_critic))
    for got, want in pairs:
        for (name, a), (_, b) in zip(got.named_parameters(), want.named_parameters(), strict=True):
            assert torch.allclose(a, b, atol=2e-6, rtol=0), f"{name}: {(a - b).abs().max():.2e}"
    start = _tiny_lm(tok)
    with torch.no_grad():
        start.get_output_embeddings().weight.mul_(4.0)
    delta = max((a - b).abs().max().item() for a, b in zip(trainer.policy.parameters(), start.parameters()))
    assert delta > 1e-3, "the update must move the weights for the comparison to mean something"
