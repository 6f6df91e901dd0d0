"""PPO with LoRA adapters on a tiny Llama, end to end: only the adapters train, the reference is
the same module with them off (no second copy), and the exported model is a plain Llama that
gives the adapted logits."""

from __future__ import annotations

import pytest
import torch

from rlhf.algos.lora import AdapterOffReference
from rlhf.algos.ppo import PPOConfig, PPOTrainer
from rlhf.generation import SamplingParams
from tests.llama_helpers import chat_tokenizer, tiny_llama

pytest.importorskip("peft")
torch.set_num_threads(1)


def test_lora_ppo_trains_the_adapters_only_and_rho_is_the_base_with_them_off():
    tok = chat_tokenizer()
    model = tiny_llama(len(tok), seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def reward(prompts, responses):  # the share of the response's characters that are "a", x 10
        return torch.tensor([10 * r.count("a") / max(len(r), 1) for r in responses])

    prompts = [tok.apply_chat_template([{"role": "user", "content": f"write about the {w}"}], tokenize=False,
                                       add_generation_prompt=True) for w in ("sun", "night", "ship", "wind")] * 2
    # 8 rollouts a step, 4 epochs of 2 minibatches: the reward rises at every seed tried (0..3), by
    # 0.2 to 2.3 over 20 steps (a smaller batch learnt at some seeds only)
    cfg = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=4, lr=5e-3, value_lr=3e-3, kl_coef=0.01,
                    kl_target=None, adaptive_kl=False, add_bos=False, max_prompt_tokens=64,
                    sampling=SamplingParams(max_new_tokens=8), finetune="lora", lora_rank=4, lora_alpha=8.0)
    trainer = PPOTrainer(model, tok, reward, cfg)
    assert isinstance(trainer.ref, AdapterOffReference) and trainer.ref.policy is trainer.policy
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    history = [trainer.step(prompts) for _ in range(20)]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # B = 0 at the start: pi = rho
    early = sum(h["reward"] for h in history[:5]) / 5
    late = sum(h["reward"] for h in history[-5:]) / 5
    assert late > early + 0.15, (early, late)  # from ~0.4
    assert history[-1]["kl"] > 0.05

    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "the sea"}], add_generation_prompt=True)])
    with torch.no_grad():
        adapted = trainer.policy(input_ids=ids).logits
        off = trainer.ref(input_ids=ids).logits
    exported = trainer.export_policy()
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in k for k in exported.state_dict())
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, adapted, atol=1e-4)
        base = tiny_llama(len(tok), seed=1)
        assert torch.allclose(base(ids).logits, off, atol=1e-5)  # rho was the untouched base all along
    changed = [k for k, v in exported.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                           for k in changed)


def test_lora_refuses_a_separate_value_model():
    with pytest.raises(ValueError, match="value_model=shared"):
        PPOConfig(finetune="lora", value_model="separate")
