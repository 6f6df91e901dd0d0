"""PPOTrainer with rollout_backend="engine": rollouts from the inference engine's runners, the
same PPO step as on the sampler, a LoRA policy whose next rollout reflects the update, and the
configurations it refuses."""

from __future__ import annotations

import pytest
import torch

from rlhf.algos.ppo import PPOConfig, PPOTrainer
from rlhf.generation import SamplingParams
from rlhf.inference.runners import LlamaRunner, make_runner
from rlhf.models import TinyLMConfig, build_tiny_lm, train_tokenizer
from tests.llama_helpers import chat_tokenizer, tiny_llama

torch.set_num_threads(1)

SUBJECTS = ["cats", "dogs", "rivers", "trains", "apples", "stars", "boats", "clouds"]
TEXTS = [f"Tell me about {s}. {s.capitalize()} are a fine thing and a lot of fun." for s in SUBJECTS]
PROMPTS = [f"Tell me about {s}." for s in SUBJECTS]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def _reward(prompts, responses):  # the share of "a" among the response's characters, x 10
    return torch.tensor([10 * r.count("a") / max(len(r), 1) for r in responses])


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sampled_logprobs(model, r, temperature=1.0):
    """log softmax(z / T) at the response tokens, from one full forward pass (no min_new_tokens)."""
    att = r.attention_mask
    P = r.prompt_ids.shape[1]
    with torch.no_grad():
        z = model(input_ids=r.input_ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    lp = torch.log_softmax(z[:, P - 1 : -1].float() / temperature, -1).gather(-1, r.response_ids[..., None])[..., 0]
    return lp * r.response_mask


def test_engine_step_at_lr_0_has_ratio_1_and_matches_the_sampler(tok):
    """Same seed on both backends: the same responses, and the first step's statistics agree
    (the engine's values from its runner's hidden states, the sampler's from the model's); at lr 0 the
    ratio is 1 on every minibatch and nothing moves."""
    results, rollouts = {}, {}
    for backend in ("sampler", "engine"):
        lm = build_tiny_lm(TinyLMConfig(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)), seed=0)
        cfg = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=2, lr=0.0, max_prompt_tokens=16, seed=0,
                        sampling=SamplingParams(max_new_tokens=8, temperature=0.9, min_new_tokens=2),
                        rollout_backend=backend)
        tr = PPOTrainer(lm, tok, _reward, cfg)
        with torch.no_grad():  # a value head that is not zero: the values must come from somewhere
            tr.value_head.summary.weight.copy_(torch.randn(tr.value_head.summary.weight.shape,
                                                           generator=torch.Generator().manual_seed(1)))
        before = _state(tr.policy)
        results[backend] = tr.step(PROMPTS)
        assert all(torch.equal(v, before[k]) for k, v in _state(tr.policy).items())
        # generate's own arguments: another stream, values skipped
        rollouts[backend] = tr.generate(PROMPTS, generator=torch.Generator().manual_seed(5), values=False)
    e, s = results["engine"], results["sampler"]
    assert e["approx_kl"] < 1e-10 and e["clipfrac_ratio"] == 0.0 and e["behaviour_approx_kl"] == 0.0
    assert e["_responses"] == s["_responses"]
    for k in ("reward", "kl", "policy_loss", "value_loss", "entropy", "response_length_tokens", "approx_kl"):
        assert e[k] == pytest.approx(s[k], abs=1e-4), k
    assert abs(e["value_loss"]) > 1e-3  # the values were not zeros on either side
    assert torch.equal(rollouts["engine"].response_ids, rollouts["sampler"].response_ids)
    assert torch.allclose(rollouts["engine"].logprobs, rollouts["sampler"].logprobs, atol=1e-4)
    assert rollouts["engine"].values is None and rollouts["sampler"].values is None


def test_lora_engine_step_trains_the_adapters_and_the_next_rollout_samples_them():
    tok = chat_tokenizer()
    model = tiny_llama(len(tok), seed=1)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"write about the {w}"}], tokenize=False,
                                       add_generation_prompt=True) for w in ("sun", "night", "ship", "wind")]
    cfg = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, lr=5e-2, kl_coef=0.01, kl_target=None,
                    adaptive_kl=False, add_bos=False, max_prompt_tokens=64, sampling=SamplingParams(max_new_tokens=6),
                    finetune="lora", lora_rank=4, lora_alpha=8.0, rollout_backend="engine")
    trainer = PPOTrainer(model, tok, _reward, cfg)
    assert isinstance(make_runner(trainer.policy, 1, 8), LlamaRunner)  # the packed runner, adapters folded in (fp32)
    before = _state(trainer.policy)
    r0 = trainer.generate(prompts)
    assert torch.allclose(r0.logprobs, _sampled_logprobs(trainer.ref, r0), atol=1e-4)  # B = 0: the base
    m = trainer.step(prompts)
    assert m["approx_kl"] >= 0 and m["kl"] == pytest.approx(0.0, abs=1e-5)
    changed = {k for k, v in _state(trainer.policy).items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed), changed

    r = trainer.generate(prompts)
    new = _sampled_logprobs(trainer.policy, r)
    assert torch.allclose(r.logprobs, new, atol=1e-4), (r.logprobs - new).abs().max()  # the updated adapters
    assert (new - _sampled_logprobs(trainer.ref, r)).abs().max() > 1e-3  # ... which moved the policy off the base


def test_lora_over_bfloat16_weights_samples_the_same_policy_on_both_backends():
    """Adapters over a bfloat16 base: the engine's runners add them beside the weights as peft's
    forward does, so the engine samples what the sampler samples and the trainer scores. (Folded
    into bfloat16 weights, this update lost most of its effect: the engine's rollout measured a KL
    of 0.0026 to rho against the policy's 0.031, with a 20x larger ratio mismatch.)"""
    tok = chat_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"write about the {w}"}], tokenize=False,
                                       add_generation_prompt=True) for w in ("sun", "night", "ship", "wind")]
    out = {}
    for backend in ("sampler", "engine"):
        cfg = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, lr=0.0, kl_coef=0.01, kl_target=None,
                        adaptive_kl=False, add_bos=False, max_prompt_tokens=64, sampling=SamplingParams(max_new_tokens=8),
                        finetune="lora", lora_rank=4, lora_alpha=8.0, rollout_backend=backend, bf16=True)
        trainer = PPOTrainer(tiny_llama(len(tok), seed=1).to(torch.bfloat16), tok, _reward, cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a young update: small B
            for n, p in trainer.policy.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 3e-3)
        out[backend] = trainer.step(prompts)
    e, s = out["engine"], out["sampler"]
    assert e["_responses"] == s["_responses"]
    assert s["kl"] > 0.01  # the adapters moved the policy off rho ...
    assert e["kl"] == pytest.approx(s["kl"], rel=0.05)  # ... and the engine sampled that policy
    assert e["approx_kl"] == pytest.approx(s["approx_kl"], rel=0.5, abs=1e-6)


def test_bad_rollout_backend_settings_are_refused(tok):
    from rlhf.config import load_config
    from rlhf.errors import ConfigError
    from rlhf.train import PPOJob

    with pytest.raises(ValueError, match="rollout_backend"):
        PPOConfig(rollout_backend="vllm")
    with pytest.raises(ConfigError, match="rollout_backend"):
        load_config(PPOJob, overrides=["ppo.rollout_backend=vllm"])
    assert load_config(PPOJob, overrides=["ppo.rollout_backend=engine"]).ppo.rollout_backend == "engine"
    # the runners read the embeddings directly: adapters on them would be ignored
    ctok = chat_tokenizer()
    cfg = PPOConfig(batch_size=4, mini_batch_size=2, finetune="lora", lora_target_modules=("embed_tokens", "q_proj"),
                    rollout_backend="engine")
    with pytest.raises(ValueError, match="embed_tokens"):
        PPOTrainer(tiny_llama(len(ctok), seed=1), ctok, _reward, cfg)


def test_the_engine_is_the_default_and_a_model_it_cannot_run_is_refused_with_the_way_out(tok):
    assert PPOConfig().rollout_backend == "engine"

    class NotHF(torch.nn.Module):  # a causal LM without a Hugging Face config
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(len(tok), 8)

    with pytest.raises(ValueError, match="Hugging Face causal LM.*rollout_backend=sampler"):
        PPOTrainer(NotHF(), tok, _reward, PPOConfig(batch_size=4, mini_batch_size=2))
