"""PPO equations of rlhf.algos.ppo against hand numbers and plain-Python loops, plus PPOTrainer
steps on a tiny GPT-2: the KV-cache rollout log-probs, the distribution PPO optimises (sampling
temperature, forced length), dropout, behaviour log-probs of stale rollouts and PPO-ptx.
(tests/algos/test_ppo_reference.py compares a whole update with a loop-written reference.)"""

from __future__ import annotations

import copy
import math
import random
import time

import pytest
import torch
import torch.nn.functional as F

from rlhf.algos.ppo import (
    PPOConfig,
    PPOTrainer,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    logprobs_of,
    policy_loss,
    truncate_at_stop,
    value_loss,
)
from rlhf.algos.masked import masked_mean
from rlhf.algos.sft import PretrainBlocks, pack_texts
from rlhf.generation import Rollout, SamplingParams, sample, tokenize_prompts
from rlhf.models import TinyLMConfig, build_tiny_lm, train_tokenizer

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------


def gae_reference(rewards, values, lengths, gamma, lam):
    """Plain double loop: per row, over its real (leading) tokens only; V after the last is 0."""
    B, R = len(rewards), len(rewards[0])
    adv = [[0.0] * R for _ in range(B)]
    ret = [[0.0] * R for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        a = 0.0
        for t in reversed(range(n)):
            v_next = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * v_next - values[b][t]
            a = delta + gamma * lam * a
            adv[b][t] = a
            ret[b][t] = a + values[b][t]
    return adv, ret


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_plain_python_loop(gamma, lam):
    rng = random.Random(17)
    B, R = 6, 7
    lengths = [7, 1, 4, 0, 5, 2]
    # padding carries garbage on purpose: it must not leak into the real tokens
    rewards = [[rng.uniform(-2, 2) for _ in range(R)] for _ in range(B)]
    values = [[rng.uniform(-2, 2) for _ in range(R)] for _ in range(B)]
    mask = torch.tensor([[1] * n + [0] * (R - n) for n in lengths])
    adv, ret = gae(torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64),
                   mask, gamma, lam)
    exp_adv, exp_ret = gae_reference(rewards, values, lengths, gamma, lam)
    for b in range(B):
        assert adv[b].tolist() == pytest.approx(exp_adv[b], abs=1e-9), f"row {b}"
        assert ret[b].tolist() == pytest.approx(exp_ret[b], abs=1e-9), f"row {b}"


def test_gae_two_token_hand_example():
    # r = [0, 1], V = [0.5, 0.25], gamma = 0.9, lambda = 0.5, one row, both tokens real
    # delta_1 = 1 + 0 - 0.25 = 0.75                    A_1 = 0.75
    # delta_0 = 0 + 0.9*0.25 - 0.5 = -0.275            A_0 = -0.275 + 0.45*0.75 = 0.0625
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.tensor([[1, 1]]), 0.9, 0.5)
    assert adv[0].tolist() == pytest.approx([0.0625, 0.75])
    assert ret[0].tolist() == pytest.approx([0.5625, 1.0])


# ----------------------------------------------------------------------------------------------
# KL-penalised rewards
# ----------------------------------------------------------------------------------------------


def test_kl_penalized_rewards_by_hand():
    scores = torch.tensor([1.0, -2.0, 5.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -9.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    logp0, ref0 = logp.clone(), ref.clone()
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, beta=0.5)
    # row 0: kl = [0.5, -1, 0]; rewards = -0.5*kl = [-0.25, 0.5, 0] + score 1 at the last token
    # row 1: kl = [0.5, -0.5, pad]; rewards = [-0.25, 0.25 - 2, 0]
    # row 2: no real token: everything 0 (the score goes nowhere)
    assert kl.tolist() == [[0.5, -1.0, 0.0], [0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]
    assert rewards.tolist() == [[-0.25, 0.5, 1.0], [-0.25, -1.75, 0.0], [0.0, 0.0, 0.0]]
    assert torch.equal(logp, logp0) and torch.equal(ref, ref0)


def test_kl_penalized_rewards_zero_beta_is_score_only():
    rewards, _ = kl_penalized_rewards(torch.tensor([3.0]), torch.tensor([[-1.0, -5.0, 0.0, 0.0]]),
                                      torch.tensor([[-2.0, -1.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0, 0]]), 0.0)
    assert rewards.tolist() == [[0.0, 3.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------------------------
# Clipped losses
# ----------------------------------------------------------------------------------------------


def test_policy_loss_clipping_by_hand():
    eps = 0.2
    # five real tokens (row 0: 3, row 1: 2) and one padding token with a wild ratio
    ratios = [[1.5, 0.5, 1.1], [1.5, 0.5, math.e**10]]
    adv = torch.tensor([[1.0, 1.0, -2.0], [-1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old = torch.full((2, 3), -2.0)
    new = old + torch.log(torch.tensor(ratios))
    loss, clipfrac, approx_kl = policy_loss(new, old, adv, mask, eps)
    # per token max(-A r, -A clip(r)):
    #   r=1.5 A=+1 : max(-1.5, -1.2) = -1.2  clipped
    #   r=0.5 A=+1 : max(-0.5, -0.8) = -0.5
    #   r=1.1 A=-2 : max( 2.2,  2.2) =  2.2
    #   r=1.5 A=-1 : max( 1.5,  1.2) =  1.5
    #   r=0.5 A=-1 : max( 0.5,  0.8) =  0.8  clipped
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 1.5 + 0.8) / 5, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 5)
    logs = [math.log(1.5), math.log(0.5), math.log(1.1), math.log(1.5), math.log(0.5)]
    assert approx_kl.item() == pytest.approx(sum(0.5 * v * v for v in logs) / 5, rel=1e-5)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([[1.0, -3.0, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    loss, clipfrac, approx_kl = policy_loss(lp, lp.clone(), adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(1.0 - 3.0 + 0.5) / 3)
    assert clipfrac.item() == 0.0 and approx_kl.item() == 0.0


def test_value_loss_clipping_by_hand():
    eps = 0.2
    values = torch.tensor([[1.0, 1.0, 0.0], [3.0, 100.0, 0.0]])
    old = torch.tensor([[0.5, 0.9, 1.0], [1.0, -100.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.5], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, clipfrac = value_loss(values, old, returns, mask, eps)
    # V=1,  Vold=.5, G=2  : clip V -> 0.7 ; (1-2)^2=1,  (0.7-2)^2=1.69 -> 1.69 clipped
    # V=1,  Vold=.9, G=0  : inside        ; 1, 1                     -> 1
    # V=0,  Vold=1,  G=.5 : clip V -> 0.8 ; 0.25, 0.09               -> 0.25
    # V=3,  Vold=1,  G=3  : clip V -> 1.2 ; 0, 3.24                  -> 3.24 clipped
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.25 + 3.24) / 4, rel=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 4)


def test_value_loss_clips_a_fall_as_well_as_a_rise():
    # V fell 1.0 below V_old = G: unclipped (V - G)^2 = 1, clipped to V_old - 0.2: 0.04 -> max 1;
    # V fell 1.0 below V_old, G = V: unclipped 0, clipped (V_old - 0.2 - G)^2 = 0.64 -> max 0.64
    values = torch.tensor([[0.0, 0.0]])
    old = torch.tensor([[1.0, 1.0]])
    returns = torch.tensor([[1.0, 0.0]])
    loss, clipfrac = value_loss(values, old, returns, torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.64) / 2, rel=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 2)


def test_gae_defaults_are_gamma_1_and_lambda_0_95():
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask)
    want_adv, want_ret = gae_reference(rewards.tolist(), values.tolist(), [5, 3, 1], 1.0, 0.95)
    for b in range(3):
        assert adv[b].tolist() == pytest.approx(want_adv[b], abs=1e-5), f"row {b}"
        assert ret[b].tolist() == pytest.approx(want_ret[b], abs=1e-5), f"row {b}"


# ----------------------------------------------------------------------------------------------
# Entropy, log-probs
# ----------------------------------------------------------------------------------------------


def test_entropy_of_uniform_logits_is_log_v():
    for V in (2, 7, 64):
        ent = entropy_from_logits(torch.full((2, 3, V), 1.234))
        assert ent.shape == (2, 3)
        assert torch.allclose(ent, torch.full((2, 3), math.log(V)), atol=1e-6)


def test_entropy_hand_distribution():
    # p = (1/2, 1/4, 1/4): H = 1/2 ln2 + 2 * 1/4 ln4 = 1.5 ln 2
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]])) + 3.0
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_logprobs_of_equals_log_softmax_gather():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g)
    tokens = torch.tensor([[0, 4, 2], [1, 1, 3]])
    got = logprobs_of(logits, tokens)
    for b in range(2):
        for t in range(3):
            row = logits[b, t].tolist()
            lse = math.log(sum(math.exp(v) for v in row))
            assert got[b, t].item() == pytest.approx(row[tokens[b, t]] - lse, abs=1e-6)
    assert torch.allclose(got, F.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1))


# ----------------------------------------------------------------------------------------------
# Stop tokens
# ----------------------------------------------------------------------------------------------


def _rollout(resp, mask, ended):
    resp, mask = torch.tensor(resp), torch.tensor(mask)
    return Rollout(
        prompt_ids=torch.ones(resp.shape[0], 2, dtype=torch.long),
        prompt_mask=torch.ones(resp.shape[0], 2, dtype=torch.long),
        response_ids=resp,
        response_mask=mask,
        logprobs=-torch.arange(1, resp.numel() + 1, dtype=torch.float).view_as(resp) * mask,
        values=torch.ones(resp.shape, dtype=torch.float) * mask,
        ended_with_eos=torch.tensor(ended),
    )


def test_truncate_at_stop_cuts_after_first_stop():
    STOP = 7
    resp = [[5, 7, 3, 7, 2], [7, 1, 1, 1, 1], [1, 2, 3, 0, 0], [1, 2, 3, 9, 7]]
    mask = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]  # row 3: the 7 is padding
    r = _rollout(resp, mask, [False, False, True, False])
    stopped = truncate_at_stop(r, [STOP], min_tokens=0)
    assert r.response_mask.tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert stopped.tolist() == [True, True, True, False]
    # log-probs and values are zeroed where the mask was cut
    assert r.logprobs[0].tolist() == [-1.0, -2.0, 0.0, 0.0, 0.0]
    assert r.values[1].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_truncate_at_stop_honours_min_tokens():
    resp = [[5, 7, 3, 7, 2], [7, 1, 1, 1, 1], [1, 1, 7, 1, 1]]
    mask = [[1] * 5] * 3
    r = _rollout(resp, mask, [False, False, False])
    # min 3 tokens: a stop at index >= 2 ends the response (the response then has >= 3 tokens)
    stopped = truncate_at_stop(r, [7], min_tokens=3)
    assert r.response_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert stopped.tolist() == [True, False, True]


def test_truncate_at_stop_several_stop_ids_and_none():
    r = _rollout([[4, 8, 9, 8]], [[1, 1, 1, 1]], [False])
    assert truncate_at_stop(r, (9, 8), 0).tolist() == [True]
    assert r.response_mask.tolist() == [[1, 1, 0, 0]]
    r = _rollout([[4, 8, 9, 8]], [[1, 1, 1, 1]], [True])
    assert truncate_at_stop(r, (), 0).tolist() == [True]
    assert r.response_mask.tolist() == [[1, 1, 1, 1]]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 10, "mini_batch_size": 4}, r"batch_size \(10\) must be a multiple of mini_batch_size \(4\)"),
        ({"batch_size": 0}, "batch_size and mini_batch_size must be >= 1"),
        ({"mini_batch_size": 0}, "batch_size and mini_batch_size must be >= 1"),
        ({"ppo_epochs": 0}, "ppo_epochs must be >= 1"),
        ({"value_model": "tied"}, "value_model must be 'shared' or 'separate'"),
        ({"kl_horizon": 0}, "kl_horizon must be >= 1"),
        ({"ptx_block_size": 1}, "ptx_block_size >= 2"),
        ({"ptx_batch_size": 0}, "ptx_batch_size must be >= 1"),
    ],
)
def test_ppo_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kwargs)


def test_ppo_config_accepts_the_smallest_valid_values():
    cfg = PPOConfig(batch_size=1, mini_batch_size=1, ppo_epochs=1, kl_horizon=1, ptx_block_size=2, ptx_batch_size=1,
                    value_model="separate", sampling=SamplingParams(max_new_tokens=1, temperature=1e-3))
    assert (cfg.batch_size, cfg.kl_horizon, cfg.ptx_block_size, cfg.value_model) == (1, 1, 2, "separate")


def test_ppo_config_normalises_fields():
    cfg = PPOConfig(batch_size=12, mini_batch_size=4, sampling={"max_new_tokens": 5, "temperature": 0.7},
                    stop_token_ids=[1, 2])
    assert cfg.sampling == SamplingParams(max_new_tokens=5, temperature=0.7)
    assert cfg.stop_token_ids == (1, 2)


# ----------------------------------------------------------------------------------------------
# A few PPO steps on a tiny model
# ----------------------------------------------------------------------------------------------

SUBJECTS = ["cats", "dogs", "rain", "music", "bread", "trains", "snow", "books", "tea", "apples", "the sea", "a map"]
TEXTS = [f"Tell me about {s}. {s.capitalize()} are a fine thing and a lot of fun." for s in SUBJECTS] + [
    f"What is {s}? It is what it is, as far as I can say." for s in SUBJECTS
]
PROMPTS = [f"Tell me about {s}." for s in SUBJECTS[:8]]

from rlhf.metrics import PPO_METRICS  # noqa: E402

# every metric DESIGN.md names for the trainer, plus throughput
METRIC_KEYS = set(PPO_METRICS) | {"samples_per_second", "tokens_per_second"}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def _tiny_lm(tok):
    return build_tiny_lm(TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)), seed=0)


def _reward_fn(tok, target_id):
    def fn(prompts, responses):
        return torch.tensor([float(tok(r, add_special_tokens=False)["input_ids"].count(target_id)) for r in responses])

    return fn


def _cfg(**kw):
    base = dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, lr=3e-3, max_prompt_tokens=16,
                sampling=SamplingParams(max_new_tokens=8), kl_coef=0.1, kl_target=6.0, seed=0)
    base.update(kw)
    return PPOConfig(**base)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full_forward(trainer, r):
    """Independent recomputation of log pi(response) and values with one full forward pass."""
    att = r.attention_mask
    pos = (att.long().cumsum(-1) - 1).clamp(min=0)
    P = r.prompt_ids.shape[1]
    with torch.no_grad():
        out = trainer.policy(input_ids=r.input_ids, attention_mask=att, position_ids=pos, output_hidden_states=True)
        logits = out.logits[:, P - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
        v = trainer.value_head(out.hidden_states[-1][:, P - 1 : -1].float())
    m = r.response_mask.float()
    return lp * m, v * m


def sampled_logprobs(model, r, temperature=1.0, min_new_tokens=0, eos=0):
    """Independent log pi_T(response) of the distribution the sampler draws from: softmax(z / T),
    renormalised without EOS (log p - log(1 - p_eos)) at response positions < min_new_tokens."""
    att = r.attention_mask
    P = r.prompt_ids.shape[1]
    with torch.no_grad():
        z = model(input_ids=r.input_ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
        lp_all = torch.log_softmax(z[:, P - 1 : -1].float() / temperature, -1)  # (B, R, V)
    lp = lp_all.gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
    blocked = torch.arange(lp.shape[1]) < min_new_tokens  # (R,)
    lp = torch.where(blocked, lp - torch.log1p(-lp_all[..., eos].exp()), lp)
    return torch.where(r.response_mask.bool(), lp, torch.zeros_like(lp)), lp_all


def _perturbed(model, scale=0.5, seed=1):
    """A copy of ``model`` with noise on every weight: a reference the policy differs from."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-2))
    return m


def test_ppo_steps_on_tiny_model(tok):
    torch.manual_seed(0)
    target = tok(" a", add_special_tokens=False)["input_ids"][0]
    policy = _tiny_lm(tok)
    # the sampler's values and log-probs against a full forward (the engine's: tests/inference/test_rollouts.py)
    trainer = PPOTrainer(policy, tok, _reward_fn(tok, target), _cfg(logprobs_from_rollout=True, rollout_backend="sampler"))
    ref0, pol0 = _state(trainer.ref), _state(trainer.policy)

    captured, ref_lps = [], []
    orig_generate = trainer.generate

    def generate(prompts):
        r = orig_generate(prompts)
        lp, v = _full_forward(trainer, r)  # the policy has not been updated yet in this step
        captured.append((r.logprobs.clone(), lp, r.values.clone(), v, r.response_mask.clone()))
        ref_lps.append(sampled_logprobs(trainer.ref, r)[0])
        return r

    trainer.generate = generate
    history = [trainer.step(PROMPTS) for _ in range(3)]

    for m in history:
        assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
        for k in METRIC_KEYS:
            assert math.isfinite(m[k]), k
        assert 1 <= m["response_length_tokens"] <= 8
        assert 0.0 <= m["clipfrac_ratio"] <= 1.0
        assert m["samples_per_second"] > 0 and m["tokens_per_second"] > 0
        assert len(m["_responses"]) == 8
    # the KL coefficient follows the adaptive controller: kl_coef of step t+1 is kl_coef_next of step t
    assert history[0]["kl_coef"] == pytest.approx(0.1)
    assert history[1]["kl_coef"] == pytest.approx(history[0]["kl_coef_next"])
    e = min(max((history[0]["kl"] - 6.0) / 6.0, -0.2), 0.2)
    assert history[0]["kl_coef_next"] == pytest.approx(0.1 * (1 + 0.1 * e))
    # first step: the policy equals the reference, so the measured KL is zero; later steps
    # report sum_t log pi/rho over each response, batch mean, pi and rho computed independently
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    for m, (_, lp, _, _, mask), lp_ref in zip(history, captured, ref_lps):
        assert m["kl"] == pytest.approx(((lp - lp_ref) * mask).sum(1).mean().item(), abs=5e-4)
    assert abs(history[2]["kl"]) > 1e-3, "the policy has moved: the KL check above must not be vacuous"

    # the KV-cache rollout's log-probs (and values) equal a fresh full forward pass
    for step, (r_lp, f_lp, r_v, f_v, mask) in enumerate(captured):
        assert mask.sum() > 0
        assert torch.allclose(r_lp, f_lp, atol=1e-4), f"step {step}: {(r_lp - f_lp).abs().max()}"
        assert torch.allclose(r_v, f_v, atol=1e-4), f"step {step}: {(r_v - f_v).abs().max()}"
    # after one update the value head is no longer zero, so the value check above meant something
    assert captured[-1][2].abs().sum() > 0

    for k, v in _state(trainer.ref).items():
        assert torch.equal(v, ref0[k]), f"reference parameter {k} changed"
    changed = [k for k, v in _state(trainer.policy).items() if not torch.equal(v, pol0[k])]
    assert changed, "no policy parameter changed"
    assert all(not p.requires_grad for p in trainer.ref.parameters())


def test_logprobs_from_rollout_switch_changes_only_how(tok):
    """Same seed, same rollouts: the first step's statistics agree with either log-prob source.
    Two layers and a value head that is not zero, so that the values read the last layer's
    hidden state on both paths."""
    target = tok(" a", add_special_tokens=False)["input_ids"][0]
    results = []
    for flag in (True, False):
        torch.manual_seed(0)
        lm = build_tiny_lm(TinyLMConfig(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)), seed=0)
        tr = PPOTrainer(lm, tok, _reward_fn(tok, target), _cfg(logprobs_from_rollout=flag, ppo_epochs=1))
        with torch.no_grad():
            tr.value_head.summary.weight.copy_(torch.randn(tr.value_head.summary.weight.shape,
                                                           generator=torch.Generator().manual_seed(1)))
        results.append(tr.step(PROMPTS))
    a, b = results
    assert a["_responses"] == b["_responses"]
    for k in ("reward", "kl", "policy_loss", "value_loss", "entropy", "response_length_tokens"):
        assert a[k] == pytest.approx(b[k], abs=1e-4), k


def test_ppo_separate_value_model_and_ptx(tok):
    torch.manual_seed(0)
    target = tok(" a", add_special_tokens=False)["input_ids"][0]
    # one pre-training block, so whatever blocks a step draws, its PPO-ptx batch is that block
    block = pack_texts(tok, TEXTS, 16)[:1]
    cfg = _cfg(value_model="separate", ptx_coef=2.0, ptx_batch_size=4, ppo_epochs=1, mini_batch_size=8)
    trainer = PPOTrainer(_tiny_lm(tok), tok, _reward_fn(tok, target), cfg, ptx_blocks=PretrainBlocks(block))
    critic0 = _state(trainer.critic)
    assert not hasattr(trainer.critic, "lm_head"), "the critic is a trunk: no LM head to run and discard"
    assert not {id(p) for p in trainer.critic.parameters()} & {id(p) for p in trainer.policy.parameters()}

    def nll(model):  # -log pi(block) per token, computed here
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=block).logits[0, :-1].float(), -1)
        return -lp.gather(-1, block[0, 1:, None]).mean().item()

    before = nll(trainer.policy)
    history = [trainer.step(PROMPTS) for _ in range(4)]
    # one minibatch per step: the reported PPO-ptx loss is the block's NLL before that step's update
    assert history[0]["ptx_loss"] == pytest.approx(before, rel=1e-4)
    assert METRIC_KEYS <= set(history[-1])
    assert math.isfinite(history[-1]["value_loss"]) and math.isfinite(history[-1]["policy_loss"])
    # PPO-ptx maximises log pi(x) of pre-training text: the block's NLL falls step after step
    after = nll(trainer.policy)
    assert [h["ptx_loss"] for h in history] == sorted((h["ptx_loss"] for h in history), reverse=True)
    assert after < before - 0.3, (before, after)
    assert any(not torch.equal(v, critic0[k]) for k, v in _state(trainer.critic).items())


def test_ppo_argument_errors(tok):
    fn = _reward_fn(tok, 1)
    with pytest.raises(ValueError, match="pre-training text"):
        PPOTrainer(_tiny_lm(tok), tok, fn, _cfg(ptx_coef=0.1))  # no ptx_blocks
    trainer = PPOTrainer(_tiny_lm(tok), tok, fn, _cfg())
    with pytest.raises(ValueError):
        trainer.step(PROMPTS[:3])


def test_rollout_logprobs_reflect_min_new_tokens(tok):
    """The rollout's log-probs are those of the distribution sampled from: while min_new_tokens
    forbids EOS, each token's probability is renormalised over the other tokens."""
    torch.manual_seed(0)
    cfg = _cfg(sampling=SamplingParams(max_new_tokens=6, min_new_tokens=4), ppo_epochs=1)
    trainer = PPOTrainer(_tiny_lm(tok), tok, _reward_fn(tok, 1), cfg)
    r = trainer.generate(PROMPTS)
    lp, lp_all = sampled_logprobs(trainer.policy, r, 1.0, 4, tok.eos_token_id)
    assert torch.allclose(r.logprobs, lp, atol=1e-4), (r.logprobs - lp).abs().max()
    plain, _ = _full_forward(trainer, r)
    p_eos = lp_all[..., tok.eos_token_id].exp()
    assert (r.logprobs[:, :4] > plain[:, :4]).all() and p_eos[:, :4].min() > 1e-4  # the EOS mass went elsewhere
    assert torch.allclose(r.logprobs[:, 4:], plain[:, 4:], atol=1e-4)  # and from position 4 on, nothing changes


def test_stop_tokens_and_missing_stop_penalty(tok):
    torch.manual_seed(0)
    target = tok(" a", add_special_tokens=False)["input_ids"][0]
    fn = _reward_fn(tok, target)
    # every token is a stop token and responses need >= 2 tokens: each response is cut to exactly 2
    # (EOS cannot be sampled before token 3, so no row ends before the stop tokens cut it)
    cfg = _cfg(stop_token_ids=tuple(range(len(tok))), min_response_tokens=2, missing_stop_penalty=-3.0, ppo_epochs=1,
               sampling=SamplingParams(max_new_tokens=8, min_new_tokens=2))
    trainer = PPOTrainer(_tiny_lm(tok), tok, fn, cfg)
    seen = []
    orig = trainer.generate
    trainer.generate = lambda p: seen.append(orig(p)) or seen[-1]
    m = trainer.step(PROMPTS)
    r = seen[0]
    assert m["response_length_tokens"] == 2.0
    assert r.response_mask.sum(1).tolist() == [2] * 8
    assert m["stopped_fraction"] == 1.0
    assert m["_scores"].tolist() == fn(PROMPTS, m["_responses"]).tolist()  # no penalty: every row stopped

    # no stop tokens: rows that did not end with EOS get the penalty instead of their score
    torch.manual_seed(0)
    trainer = PPOTrainer(_tiny_lm(tok), tok, fn, _cfg(missing_stop_penalty=-3.0, ppo_epochs=1))
    seen.clear()
    orig = trainer.generate
    trainer.generate = lambda p: seen.append(orig(p)) or seen[-1]
    m = trainer.step(PROMPTS)
    ended = seen[0].ended_with_eos.tolist()
    raw = fn(PROMPTS, m["_responses"]).tolist()
    assert m["_scores"].tolist() == [s if e else -3.0 for s, e in zip(raw, ended)]
    assert m["stopped_fraction"] == pytest.approx(sum(ended) / 8)
    assert not all(ended)


def test_step_metrics_cover_every_design_metric_name():
    from rlhf.metrics import PPO_METRICS, ppo_metric_values

    names = {n for n, _, _ in PPO_METRICS.values()}
    assert {"rlhf_ppo_kl", "rlhf_ppo_reward", "rlhf_ppo_kl_coef", "rlhf_ppo_samples_total"} <= names
    assert all(n.startswith("rlhf_ppo_") and ":" not in n for n in names)
    assert all((kind == "counter") == n.endswith("_total") for n, kind, _ in PPO_METRICS.values())
    values = ppo_metric_values({"kl": 1.5, "samples_total": 8, "unrelated": 3})
    assert values == {"rlhf_ppo_kl": 1.5, "rlhf_ppo_samples_total": 8.0}


def test_value_head_gets_its_own_learning_rate(tok):
    fn = _reward_fn(tok, 5)
    same = PPOTrainer(_tiny_lm(tok), tok, fn, _cfg(lr=1e-5))
    assert [g["lr"] for g in same.opt.param_groups] == [1e-5, 1e-5]
    own = PPOTrainer(_tiny_lm(tok), tok, fn, _cfg(lr=1e-5, value_lr=1e-3, value_model="separate"))
    assert [g["lr"] for g in own.opt.param_groups] == [1e-5, 1e-3]
    value_params = {id(p) for p in own.opt.param_groups[1]["params"]}
    assert {id(p) for p in own.value_head.parameters()} | {id(p) for p in own.critic.parameters()} == value_params
    assert not value_params & {id(p) for p in own.policy.parameters()}


def test_entropy_bonus_alone_moves_the_policy_towards_higher_entropy(tok):
    """With zero reward, no KL penalty and no value loss, the advantages are all zero: without an
    entropy bonus the policy cannot change; with one, its entropy rises."""
    zero = lambda prompts, responses: torch.zeros(len(responses))  # noqa: E731
    ids = tok(TEXTS, return_tensors="pt", padding=True)

    def mean_entropy(model):
        with torch.no_grad():
            logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        return masked_mean(entropy_from_logits(logits), ids["attention_mask"].float()).item()

    results = {}
    for coef in (0.0, 1.0):
        torch.manual_seed(0)
        cfg = _cfg(entropy_coef=coef, kl_coef=0.0, adaptive_kl=False, kl_target=None, vf_coef=0.0)
        policy = _tiny_lm(tok)
        with torch.no_grad():  # a random tiny LM is near uniform (entropy ~log V): sharpen it first
            policy.get_output_embeddings().weight.mul_(8.0)
        before = mean_entropy(policy)
        trainer = PPOTrainer(policy, tok, zero, cfg)
        pol0 = _state(trainer.policy)
        for _ in range(3):
            trainer.step(PROMPTS)
        changed = [k for k, v in _state(trainer.policy).items() if not torch.equal(v, pol0[k])]
        results[coef] = (before, mean_entropy(trainer.policy), changed)
    assert results[0.0][2] == [], "zero advantages and no bonus must leave the policy as it was"
    before, after, changed = results[1.0]
    assert changed, "the bonus must move the policy"
    assert after > before + 0.05, (before, after)


# ----------------------------------------------------------------------------------------------
# What PPO optimises: dropout off, the sampled distribution, behaviour log-probs, the horizon
# ----------------------------------------------------------------------------------------------


def _dropout_gpt2(tok, p=0.1):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, bos_token_id=0, eos_token_id=0))


def test_dropout_is_off_in_every_model_ppo_holds(tok):
    """A GPT-2 with dropout 0.1 (as Hugging Face checkpoints come): one PPO step at lr 0 must see
    ratio 1 on every minibatch, though the update runs in train mode."""
    policy = _dropout_gpt2(tok)
    ids = tok(TEXTS[:4], return_tensors="pt", padding=True)["input_ids"]
    policy.train()
    with torch.no_grad():  # the model as loaded does drop out in train mode: this test can fail
        assert not torch.allclose(policy(input_ids=ids).logits, policy(input_ids=ids).logits)
    ref = _dropout_gpt2(tok)
    cfg = _cfg(lr=0.0, value_lr=0.0, value_model="separate", ppo_epochs=2)
    trainer = PPOTrainer(policy, tok, _reward_fn(tok, 5), cfg, ref_model=ref)
    m = trainer.step(PROMPTS)
    assert m["approx_kl"] < 1e-6 and m["clipfrac_ratio"] == 0.0
    for model in (trainer.policy, trainer.ref, trainer.critic):
        rates = [x.p for x in model.modules() if isinstance(x, torch.nn.Dropout)]
        assert rates and set(rates) == {0.0}


@pytest.mark.parametrize("temperature, min_new", [(0.7, 0), (0.7, 5), (1.4, 8)])
def test_ppo_optimises_the_distribution_it_samples(tok, temperature, min_new):
    """T != 1 and forced length (min_new_tokens = max_new_tokens when 8): at lr 0 the ratio is 1,
    the rollout log-probs are those of the sampled distribution, and the reported KL is a
    Monte-Carlo estimate of KL(pi_T || rho_T) on the same samples."""
    torch.manual_seed(0)
    policy = _tiny_lm(tok)
    with torch.no_grad():  # a random tiny LM is near uniform: sharpen it so that T matters
        policy.get_output_embeddings().weight.mul_(6.0)
    ref = _perturbed(policy)
    eos = tok.eos_token_id
    cfg = _cfg(lr=0.0, value_lr=0.0, batch_size=64, mini_batch_size=16, ppo_epochs=1, kl_coef=0.1,
               sampling=SamplingParams(max_new_tokens=8, temperature=temperature, min_new_tokens=min_new))
    trainer = PPOTrainer(policy, tok, _reward_fn(tok, 5), cfg, ref_model=ref)
    seen = []
    orig = trainer.generate
    trainer.generate = lambda p: seen.append(orig(p)) or seen[-1]
    m = trainer.step(PROMPTS * 8)
    r = seen[0]
    assert m["approx_kl"] < 1e-6 and m["clipfrac_ratio"] == 0.0
    lp_pi, all_pi = sampled_logprobs(policy, r, temperature, min_new, eos)
    lp_rho, all_rho = sampled_logprobs(ref, r, temperature, min_new, eos)
    assert torch.allclose(r.logprobs, lp_pi, atol=1e-4)
    if min_new:
        assert (r.response_mask.sum(1) >= min_new).all()
    mask = r.response_mask.float()
    per_row = ((lp_pi - lp_rho) * mask).sum(1)  # (B,) one sample of log pi_T(y)/rho_T(y) each
    assert m["kl"] == pytest.approx(per_row.mean().item(), abs=5e-4)
    # the exact KL(pi_T || rho_T) of each next-token distribution along the same prefixes: its sum
    # has the same expectation as the single-sample estimate; they agree within Monte-Carlo error
    blocked = (torch.arange(mask.shape[1]) < min_new)[None, :, None]  # (1, R, 1)
    vocab_eos = torch.zeros(all_pi.shape[-1], dtype=torch.bool)
    vocab_eos[eos] = True

    def renorm(a):  # the distribution sampled from: EOS removed where blocked
        a = torch.where(blocked & vocab_eos, torch.tensor(float("-inf")), a)
        return torch.log_softmax(a, -1)

    p_pi, p_rho = renorm(all_pi), renorm(all_rho)
    token_kl = (p_pi.exp() * (p_pi - p_rho).nan_to_num(0.0, posinf=0.0, neginf=0.0)).sum(-1)  # (B, R)
    exact = (token_kl * mask).sum(1)
    err = (per_row - exact).std().item() / math.sqrt(len(exact))
    assert exact.mean().item() > 0.2, "the policy and its reference must differ for this test to mean something"
    assert abs(m["kl"] - exact.mean().item()) < 4 * err, (m["kl"], exact.mean().item(), err)


@pytest.mark.parametrize("sampling, word", [({"top_k": 50}, "top_k"), ({"top_p": 0.9}, "top_p"),
                                            ({"temperature": 0.0}, "temperature")])
def test_ppo_refuses_sampling_it_cannot_optimise(sampling, word):
    from rlhf.config import load_config
    from rlhf.errors import ConfigError
    from rlhf.train import PPOJob

    with pytest.raises(ValueError, match=word):
        PPOConfig(sampling=SamplingParams(max_new_tokens=4, **sampling))
    key, value = next(iter(sampling.items()))
    with pytest.raises(ConfigError, match=word):
        load_config(PPOJob, overrides=[f"ppo.sampling.{key}={value}"])


def _served_rollout(model, tok, sampling, seed=5):
    """A rollout as a policy-server would return it: sampled elsewhere, with the log-probs of the
    distribution sampled from."""
    ids, mask = tokenize_prompts(tok, PROMPTS, 16, add_bos=True)
    return sample(model, ids, mask, sampling, tok.eos_token_id, tok.pad_token_id,
                  generator=torch.Generator().manual_seed(seed), logprobs="sampling")


def _clone(r):
    return Rollout(*(x.clone() if x is not None else None for x in (
        r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.logprobs, r.values, r.ended_with_eos)))


def test_behaviour_logprobs_of_the_current_weights_agree_with_recomputed_ones(tok):
    sampling = SamplingParams(max_new_tokens=6, temperature=0.8, min_new_tokens=2)
    results = []
    for behaviour in (False, True):
        torch.manual_seed(0)
        trainer = PPOTrainer(_tiny_lm(tok), tok, _reward_fn(tok, 5), _cfg(ppo_epochs=2, sampling=sampling))
        r = _served_rollout(trainer.policy, tok, sampling)
        results.append(trainer.step_on_rollout(PROMPTS, r, behaviour_logprobs=behaviour))
    recomputed, behaviour = results
    assert behaviour["behaviour_approx_kl"] < 1e-8
    for k in ("kl", "reward", "policy_loss", "value_loss", "approx_kl", "clipfrac_ratio", "entropy"):
        assert behaviour[k] == pytest.approx(recomputed[k], abs=1e-4), k


def test_stale_rollouts_start_the_ratio_at_pi_over_behaviour(tok):
    """A rollout of weights two updates old: the ratio is taken against its behaviour log-probs
    (recomputing them would pretend it was fresh); the KL penalty uses the current weights."""
    torch.manual_seed(0)
    sampling = SamplingParams(max_new_tokens=6, temperature=0.8, min_new_tokens=2)
    cfg = _cfg(ppo_epochs=1, mini_batch_size=8, lr=1e-2, sampling=sampling)

    def reward_fn(prompts, responses):  # varies between rows, so that the two updates move the policy
        return torch.tensor([float(len(r)) for r in responses])

    trainer = PPOTrainer(_tiny_lm(tok), tok, reward_fn, cfg, ref_model=_tiny_lm(tok))
    old = copy.deepcopy(trainer.policy)
    trainer.step(PROMPTS)
    trainer.step(PROMPTS)
    for g in trainer.opt.param_groups:  # lr 0 from here: the ratio below is exactly pi_current / mu
        g["lr"] = 0.0
    r = _served_rollout(old, tok, sampling)
    lp_now, _ = sampled_logprobs(trainer.policy, r, 0.8, 2, tok.eos_token_id)
    mask = r.response_mask.float()
    expected = masked_mean(0.5 * (lp_now - r.logprobs) ** 2, mask).item()
    assert expected > 1e-4, "the two versions must differ for this test to mean something"
    stale = trainer.step_on_rollout(PROMPTS, _clone(r), behaviour_logprobs=True)
    fresh = trainer.step_on_rollout(PROMPTS, _clone(r))  # the default: recomputed with the current weights
    assert stale["behaviour_approx_kl"] == pytest.approx(expected, rel=1e-3)
    assert stale["approx_kl"] == pytest.approx(expected, rel=1e-3)  # one minibatch: the update saw pi / mu
    assert fresh["approx_kl"] < 1e-8 and fresh["behaviour_approx_kl"] == 0.0
    lp_ref, _ = sampled_logprobs(trainer.ref, r, 0.8, 2, tok.eos_token_id)
    kl_now = ((lp_now - lp_ref) * mask).sum(1).mean().item()
    assert stale["kl"] == pytest.approx(kl_now, abs=5e-4) and fresh["kl"] == pytest.approx(kl_now, abs=5e-4)


def test_step_on_rollout_rejects_what_was_not_sampled_so(tok):
    sampling = SamplingParams(max_new_tokens=6, min_new_tokens=3)
    trainer = PPOTrainer(_tiny_lm(tok), tok, _reward_fn(tok, 5), _cfg(sampling=sampling))
    r = _served_rollout(trainer.policy, tok, sampling)
    bad = _clone(r)
    bad.response_ids[1, 1] = tok.eos_token_id  # an EOS where min_new_tokens forbids it
    with pytest.raises(ValueError, match="min_new_tokens"):
        trainer.step_on_rollout(PROMPTS, bad, behaviour_logprobs=True)
    bad = _clone(r)
    bad.logprobs[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="finite"):
        trainer.step_on_rollout(PROMPTS, bad, behaviour_logprobs=True)


def test_kl_horizon_moves_beta_by_the_episodes_of_the_step(tok):
    policy = _tiny_lm(tok)
    with torch.no_grad():
        policy.get_output_embeddings().weight.mul_(6.0)
    cfg = _cfg(kl_coef=0.2, kl_target=0.05, kl_horizon=100)
    trainer = PPOTrainer(policy, tok, _reward_fn(tok, 5), cfg, ref_model=_perturbed(policy))
    m = trainer.step(PROMPTS)
    e = min(max((m["kl"] - 0.05) / 0.05, -0.2), 0.2)
    assert e != 0.0
    assert m["kl_coef_next"] == pytest.approx(0.2 * (1 + e * 8 / 100))  # 8 rollouts of a 100-episode horizon


def test_step_metrics_are_what_they_say(tok):
    """Every reported figure of two steps against an independent computation on the rollouts."""
    torch.manual_seed(0)
    sampling = SamplingParams(max_new_tokens=6, temperature=0.9, min_new_tokens=1)
    policy = _tiny_lm(tok)
    ref = _perturbed(policy)
    fn = _reward_fn(tok, tok(" a", add_special_tokens=False)["input_ids"][0])
    cfg = _cfg(lr=0.0, value_lr=0.0, mini_batch_size=8, ppo_epochs=1, kl_coef=0.25, sampling=sampling,
               missing_stop_penalty=None)
    trainer = PPOTrainer(policy, tok, lambda p, r: fn(p, r) + torch.arange(len(r)) * 0.5, cfg, ref_model=ref)
    seen = []
    orig = trainer.generate
    trainer.generate = lambda p: seen.append(orig(p)) or seen[-1]
    history = [trainer.step(PROMPTS) for _ in range(2)]
    tokens = 0
    for step, (m, r) in enumerate(zip(history, seen), start=1):
        mask = r.response_mask.float()
        scores = fn(PROMPTS, m["_responses"]) + torch.arange(8) * 0.5
        lp, all_pi = sampled_logprobs(policy, r, 0.9, 1, tok.eos_token_id)
        lp_ref, _ = sampled_logprobs(ref, r, 0.9, 1, tok.eos_token_id)
        kl_rows = ((lp - lp_ref) * mask).sum(1)
        tokens += int(mask.sum())
        assert m["step"] == step and m["samples_total"] == 8 * step and m["tokens_total"] == tokens
        assert m["_scores"].tolist() == scores.tolist()
        assert m["reward"] == pytest.approx(scores.mean().item()) and m["reward_std"] == pytest.approx(scores.std().item())
        assert m["kl"] == pytest.approx(kl_rows.mean().item(), abs=5e-4)
        beta = 0.25 if step == 1 else history[0]["kl_coef_next"]
        assert m["reward_total"] == pytest.approx((scores - beta * kl_rows).mean().item(), abs=5e-4)
        assert m["response_length_tokens"] == pytest.approx(mask.sum(1).mean().item())
        assert m["stopped_fraction"] == pytest.approx(r.ended_with_eos.float().mean().item())
        blocked = torch.arange(6)[None, :, None] < 1
        sampled = torch.log_softmax(torch.where(blocked & (torch.arange(len(tok)) == tok.eos_token_id), -torch.inf,
                                                all_pi), -1)
        ent = -(sampled.exp() * sampled.nan_to_num(0.0, neginf=0.0)).sum(-1)  # (B, R)
        assert m["entropy"] == pytest.approx(((ent * mask).sum() / mask.sum()).item(), rel=1e-4)
        assert m["approx_kl"] < 1e-8 and m["clipfrac_ratio"] == 0.0 and m["value_clipfrac_ratio"] == 0.0
        assert m["kl_coef"] == beta and m["kl_coef_next"] == pytest.approx(
            beta * (1 + 0.1 * min(max((m["kl"] - 6.0) / 6.0, -0.2), 0.2)))
        assert abs(m["policy_loss"]) < 1e-5  # ratio 1: minus the mean whitened advantage, 0
        assert m["time_generate_seconds"] >= 0 and m["step_duration_seconds"] >= m["time_update_seconds"] > 0
        assert m["samples_per_second"] == pytest.approx(8 / m["step_duration_seconds"])
        assert m["tokens_per_second"] == pytest.approx(mask.sum().item() / m["step_duration_seconds"])


# ----------------------------------------------------------------------------------------------
# What the trainer reports, and the switches that change how it runs
# ----------------------------------------------------------------------------------------------


def test_step_timings_add_up_and_the_kl_target_is_reported(tok):
    """The time_* parts are disjoint spans inside the step, and the step inside the call: the
    relations hold at any speed (no wall-clock bound is asserted)."""
    trainer = PPOTrainer(_tiny_lm(tok), tok, lambda p, r: torch.arange(len(r)).float(),
                         _cfg(batch_size=2, mini_batch_size=2, ppo_epochs=1))
    t0 = time.perf_counter()
    m = trainer.step(PROMPTS[:2])
    elapsed = time.perf_counter() - t0
    parts = sorted(k for k in m if k.startswith("time_"))
    assert parts == ["time_generate_seconds", "time_reference_and_value_seconds", "time_reward_seconds",
                     "time_update_seconds"]
    assert all(isinstance(m[k], float) and m[k] >= 0 for k in parts)
    assert sum(m[k] for k in parts) <= m["step_duration_seconds"] <= elapsed
    assert m["kl_target"] == 6.0
    assert m["reward_std"] == pytest.approx(math.sqrt(0.5))  # scores 0 and 1
    # a fixed beta has no target to report; one rollout has no spread
    single = PPOTrainer(_tiny_lm(tok), tok, lambda p, r: torch.ones(len(r)),
                        _cfg(batch_size=1, mini_batch_size=1, ppo_epochs=1, adaptive_kl=False, kl_target=None))
    m = single.step(PROMPTS[:1])
    assert "kl_target" not in m and m["reward_std"] == 0.0


def test_update_statistics_are_means_over_the_minibatches(tok):
    """At lr 0 every pass over the one minibatch sees the same weights: the statistics of 1 and of
    2 epochs are the same means (a sum, a last value or a wrong start would differ)."""
    block = pack_texts(tok, TEXTS, 16)[:1]  # one pre-training block: every PPO-ptx batch is the same
    fn = lambda p, r: torch.arange(len(r)).float()  # noqa: E731 - returns far from the zero-initialised values
    stats = []
    for epochs in (1, 2):
        cfg = _cfg(lr=0.0, value_lr=0.0, ppo_epochs=epochs, mini_batch_size=8, ptx_coef=0.5, ptx_batch_size=2)
        trainer = PPOTrainer(_tiny_lm(tok), tok, fn, cfg, ptx_blocks=block)  # a tensor: wrapped as PretrainBlocks
        assert isinstance(trainer.ptx, PretrainBlocks) and torch.equal(trainer.ptx.blocks, block)
        stats.append(trainer.step(PROMPTS))
    one, two = stats
    assert one["_responses"] == two["_responses"]
    for k in ("policy_loss", "value_loss", "clipfrac_ratio", "value_clipfrac_ratio", "entropy", "approx_kl",
              "ptx_loss"):
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), k
    assert one["value_loss"] > 0.01 and one["entropy"] > 1.0 and one["ptx_loss"] > 1.0  # not vacuous


def test_rollouts_follow_the_config(tok):
    """The trainer's rollouts: seeded by cfg.seed (not the global generator), prompts with BOS as
    configured, values from the rollout only for a shared head, bf16 applied to the sampling pass."""
    fn = _reward_fn(tok, 5)

    def _cfg(**kw):  # the sampler's plumbing (the engine runs in the weights' dtype, without autocast)
        return globals()["_cfg"](**{"rollout_backend": "sampler", **kw})

    first, second = (PPOTrainer(_tiny_lm(tok), tok, fn, _cfg(seed=4)) for _ in range(2))
    a = first.generate(PROMPTS)
    b = second.generate(PROMPTS)  # the global generator has moved on since the first: it must not matter
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)

    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert a.prompt_mask.sum(1).tolist() == [n + 1 for n in lengths]
    first = a.prompt_mask.argmax(1)  # left padding: the first real token
    assert a.prompt_ids[torch.arange(8), first].tolist() == [tok.bos_token_id] * 8
    no_bos = PPOTrainer(_tiny_lm(tok), tok, fn, _cfg(add_bos=False)).generate(PROMPTS)
    assert no_bos.prompt_mask.sum(1).tolist() == lengths

    assert a.values is not None  # shared head, log-probs from the rollout: values come with it
    for kw in ({"value_model": "separate"}, {"logprobs_from_rollout": False}):
        assert PPOTrainer(_tiny_lm(tok), tok, fn, _cfg(**kw)).generate(PROMPTS).values is None, kw

    half = PPOTrainer(_tiny_lm(tok), tok, fn, _cfg(seed=4, bf16=True)).generate(PROMPTS)
    assert not torch.allclose(half.logprobs, a.logprobs, atol=1e-6), "bf16 must reach the sampling pass"
    engine = PPOTrainer(_tiny_lm(tok), tok, fn, _cfg(seed=4, rollout_backend="engine")).generate(PROMPTS)
    assert torch.equal(engine.response_ids, a.response_ids)  # the same seed, the same draws
    assert torch.allclose(engine.values, a.values, atol=1e-4)  # the shared head, read on the runner's hidden states
