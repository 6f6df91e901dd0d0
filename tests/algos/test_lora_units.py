"""rlhf.algos.lora piece by piece: which layers get adapters, how peft is configured, and that
the adapter-off reference is exactly the base model (the end-to-end PPO run is in
test_lora_ppo.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from rlhf.algos import lora
from rlhf.models import TinyLMConfig, build_tiny_lm
from tests.llama_helpers import tiny_llama

pytest.importorskip("peft")
torch.set_num_threads(1)

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _gpt2():
    return build_tiny_lm(TinyLMConfig(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=64), seed=0)


def _adapted_names(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}


def _perturb_adapters(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_default_targets_are_the_architectures_linear_layers():
    assert lora.default_targets(tiny_llama(64)) == LLAMA_LINEARS
    assert lora.default_targets(_gpt2()) == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(ValueError, match="lora_target_modules"):
        lora.default_targets(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_add_lora_configures_peft_as_asked_and_starts_at_the_base(arch):
    base = tiny_llama(64, seed=2) if arch == "llama" else _gpt2()
    frozen = copy.deepcopy(base)
    model = lora.add_lora(base, rank=3, alpha=6.0)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (3, 6.0, 0.0, "none")
    assert cfg.fan_in_fan_out is (arch == "gpt2")  # GPT-2's Conv1D stores (in, out)
    assert set(cfg.target_modules) == set(lora.default_targets(frozen))
    assert _adapted_names(model) == set(lora.default_targets(frozen))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert a.shape[0] == 3  # rank 3
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():  # B = 0 at the start: the adapted model is the base
        assert torch.equal(model(input_ids=ids).logits, frozen(input_ids=ids).logits)
    _perturb_adapters(model)
    with torch.no_grad():  # alpha / r scales the adapters: they change the output once B is not 0
        assert not torch.allclose(model(input_ids=ids).logits, frozen(input_ids=ids).logits, atol=1e-4)


def test_add_lora_adapts_only_the_named_layers_and_refuses_rank_0():
    model = lora.add_lora(tiny_llama(64), rank=2, alpha=2.0, targets=("q_proj", "v_proj"))
    assert _adapted_names(model) == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="lora_rank"):
        lora.add_lora(tiny_llama(64), rank=0, alpha=2.0)


def test_the_adapter_off_reference_is_the_base_whatever_the_adapters():
    base = tiny_llama(64, seed=3)
    frozen = copy.deepcopy(base)
    policy = lora.add_lora(base, rank=4, alpha=8.0)
    _perturb_adapters(policy, seed=1)
    ref = lora.AdapterOffReference(policy)
    assert ref.config is policy.get_base_model().config
    ids = torch.tensor([[4, 8, 15, 16, 23, 42], [3, 1, 4, 1, 5, 9]])
    mask = torch.ones_like(ids)
    pos = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        want = frozen(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        assert torch.allclose(got, want, atol=1e-5)
        adapted = policy(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        assert not torch.allclose(adapted, want, atol=1e-3)  # the adapters are on again after the call
        kept = ref(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=2).logits
        assert kept.shape[1] == 2 and torch.allclose(kept, want[:, -2:], atol=1e-5)
    # eval / requires_grad_ are the trainer's calls on rho: they must leave the policy as it is
    policy.train()
    assert ref.eval() is ref and policy.training
    assert ref.requires_grad_(False) is ref
    assert any(p.requires_grad for p in policy.parameters())
    # disable_dropout walks rho's modules: they are the policy's
    assert list(ref.modules()) == list(policy.modules())
    with pytest.raises(ValueError, match="LoRA"):
        lora.AdapterOffReference(frozen)


def test_is_lora_and_merging():
    plain = tiny_llama(64, seed=4)
    assert not lora.is_lora(plain) and lora.merged(plain) is plain and lora.merged_copy(plain) is plain
    policy = lora.add_lora(copy.deepcopy(plain), rank=2, alpha=4.0)
    assert lora.is_lora(policy)
    _perturb_adapters(policy, seed=2)
    ids = torch.tensor([[2, 7, 1, 8, 2, 8]])
    with torch.no_grad():
        adapted = policy(input_ids=ids).logits
        copy_ = lora.merged_copy(policy)
        assert not lora.is_lora(copy_) and lora.is_lora(policy)  # the copy leaves the policy training on
        assert torch.allclose(copy_(input_ids=ids).logits, adapted, atol=1e-5)
        folded = lora.merged(policy)
        assert not lora.is_lora(folded) and type(folded).__name__ == "LlamaForCausalLM"
        assert torch.allclose(folded(input_ids=ids).logits, adapted, atol=1e-5)
