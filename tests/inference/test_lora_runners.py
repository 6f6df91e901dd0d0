"""The engine's runners over a model with LoRA adapters (peft): folded into a float32 weight, kept
beside a bfloat16 one as peft's forward keeps them, so that a young adapter's update is not
rounded away and the runner samples the policy being trained, not its base."""

from __future__ import annotations

import pytest
import torch

from rlhf.algos import lora
from rlhf.inference.runners import fused_linear, linear_parts, make_runner
from rlhf.models import TinyLMConfig, build_tiny_lm
from tests.llama_helpers import tiny_llama

pytest.importorskip("peft")
torch.set_num_threads(1)

SEQS = [[5, 9, 17, 3, 44], [33, 2], [12, 80, 7]]


def _models():
    return {"llama": tiny_llama(320, seed=1),
            "gpt2": build_tiny_lm(TinyLMConfig(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=320), seed=0)}


def _adapted(model, dtype, b_std: float, seed: int = 0):
    """``model`` in ``dtype`` with rank-4 adapters on every linear layer, B drawn with ``b_std``."""
    pm = lora.add_lora(model.to(dtype), 4, 8.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
    return pm


def _runner_and_forward(pm):
    logits = make_runner(pm, 4, 32).prefill([list(s) for s in SEQS], 0)
    with torch.no_grad():
        ref = torch.stack([pm(torch.tensor([s])).logits[0, -1].float() for s in SEQS])
    return logits, ref


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapters_over_bfloat16_weights_run_as_peft_runs_them(arch):
    pm = _adapted(_models()[arch], torch.bfloat16, b_std=5e-2)
    runner, forward = _runner_and_forward(pm)
    with pm.disable_adapter():
        base, _ = _runner_and_forward(pm)
    moved = (forward - base).abs().max()
    # within bfloat16 noise of the model's own forward, which the adapters move far beyond it
    assert (runner - forward).abs().max() < 0.05 * moved, ((runner - forward).abs().max(), moved)
    # the runner applied them beside the weights: its linear layers carry a low-rank term
    blk = make_runner(pm, 1, 8).blocks[0]
    assert all(blk[k].lora is not None for k in (("qkv", "o", "gate_up", "down") if arch == "llama"
                                                 else ("qkv", "proj", "fc", "out")))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapters_over_float32_weights_are_folded(arch):
    pm = _adapted(_models()[arch], torch.float32, b_std=2e-2)
    r = make_runner(pm, 4, 32)
    assert all(lin.lora is None for blk in r.blocks for lin in blk.values() if hasattr(lin, "lora"))
    runner, forward = _runner_and_forward(pm)
    assert torch.allclose(runner, forward, atol=1e-4)


def test_the_fused_low_rank_term_is_each_layers_own_update():
    """q/k/v of a bfloat16 Llama as one matmul plus one low-rank term (A's stacked, B's
    block-diagonal): each layer's share is what peft's forward of that layer gives, and nearer the
    exact (float64) adapted layer than a copy of the weights with the update folded in bfloat16."""
    pm = _adapted(tiny_llama(320, seed=1), torch.bfloat16, b_std=3e-4)
    attn = pm.get_base_model().model.layers[0].self_attn
    lins = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    runner = fused_linear(lins, pack=True)(x)
    with torch.no_grad():
        peft_out = torch.cat([lin(x) for lin in lins], 1)
        exact = torch.cat([x.double() @ (lin.base_layer.weight.double() + lin.get_delta_weight("default").double()).T
                           for lin in lins], 1)
        folded = torch.cat([x @ (lin.base_layer.weight.float() + lin.get_delta_weight("default").float())
                            .to(torch.bfloat16).T for lin in lins], 1)
        base = torch.cat([lin.base_layer(x) for lin in lins], 1)
    for lin in lins:
        assert torch.equal(linear_parts(lin)[0], lin.base_layer.weight)  # the base weight, untouched
    assert torch.allclose(runner.float(), peft_out.float(), rtol=2 ** -7, atol=2 ** -9)  # bfloat16 rounding apart
    err = lambda y: (y.double() - exact).abs().mean()  # noqa: E731
    assert err(runner) < err(folded) < err(base)
