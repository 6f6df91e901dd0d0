"""Forward passes of the inference engine over a slot KV cache.

The engine keeps every running sequence in one *slot* of a preallocated key/value cache:
slot ``i`` holds row ``i`` of the running batch, its tokens at positions ``0 .. len-1`` (no
padding inside a slot). Rows are kept dense (slots ``0 .. n-1``), so a decode step attends over a
view ``K[:n, :, :T]`` of the cache, with ``T`` the longest row and a mask that hides the
positions a shorter row has not written. A new sequence joins between two decode steps by a
prefill into the next free slot; a finished one leaves by moving the last row into its slot.

Three runners fill that contract:

* :class:`GPT2Runner`, for GPT-2 models (every model this platform trains): the forward pass
  written out over the model's own weights, with the weights pre-packed for oneDNN on the CPU.
  At the small batch of a decode step (16 rows) most of a step in ``transformers`` is framework
  overhead and un-packed matmuls (the 256 x 4096 LM head: 1.4 ms un-packed, 0.35 ms packed, in
  fp32, measured on this project's CPU); see docs/benchmarks.md for the measured effect.
* :class:`LlamaRunner`, for Llama models (SmolLM2 and other imported instruction-tuned models):
  the same written-out forward for RMSNorm, rotary position embeddings (the model's own rotary
  module, tabulated once) and grouped-query attention (the slot cache holds the key/value heads
  only; attention reads them through ``enable_gqa``), with q/k/v and gate/up each fused into one
  packed matmul. transformers' own forward copies a row's whole cache each step (``DynamicCache``
  concatenates); this one writes one position in place.
* :class:`HFRunner`, for any other Hugging Face causal LM: the model's own forward, given a
  ``DynamicCache`` built from views of the slot cache and a 2-D attention mask with the holes.

All give the same logits as ``model(input_ids)`` up to float rounding (tests/inference).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import torch
import torch.nn.functional as F

from rlhf.models import context_length

log = logging.getLogger("rlhf.inference")


class Runner(Protocol):
    max_slots: int  # rows of the running batch
    max_len: int  # positions per slot (prompt + response)

    def prefill(self, prompts: list[list[int]], slot0: int) -> torch.Tensor:
        """Write the prompts' keys/values into slots ``slot0, slot0+1, ...``; return the logits
        (float32, (len(prompts), V)) that follow each prompt's last token."""

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row of slots ``0 .. n-1`` (``tokens``, ``positions``: (n,) on the
        runner's device); returns the next-token logits, float32 (n, V)."""

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""

    # When ``keep_hidden`` is set, prefill and decode leave in ``hidden`` the final (normed) hidden
    # states their logits came from, (rows, hidden size): what a value head reads (PPO's rollouts).
    keep_hidden: bool
    hidden: torch.Tensor | None


def _right_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.tensor([p + [pad] * (T - len(p)) for p in prompts], device=device)  # (b, T)
    lens = torch.tensor([len(p) for p in prompts], device=device)  # (b,)
    return ids, lens


def _decode_mask(positions: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (n, 1, 1, T): row b sees cache positions 0 .. positions[b]."""
    ar = torch.arange(T, device=positions.device)
    ok = ar[None, :] <= positions[:, None]  # (n, T)
    return torch.zeros(ok.shape, dtype=dtype, device=positions.device).masked_fill_(~ok, float("-inf"))[:, None, None, :]


class _Linear:
    """``y = x W^T + b`` with W pre-packed for oneDNN on the CPU when that works, else F.linear."""

    packed_ok: bool | None = None  # decided once per process by a numeric check

    def __init__(self, weight_out_in: torch.Tensor, bias: torch.Tensor | None, pack: bool,
                 lora: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.w = weight_out_in.detach().contiguous()
        self.b = None if bias is None else bias.detach().contiguous()
        # LoRA adapters kept apart from a low-precision weight: (A (r, in), scale x B (out, r)), added as
        # x A^T B^T after the matmul, the way peft's own forward adds them (see linear_parts)
        self.lora = None if lora is None else tuple(t.detach().to(self.w.dtype).contiguous() for t in lora)
        self.packed = None
        if pack and self.w.device.type == "cpu" and _Linear._can_pack():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.w, None)

    @staticmethod
    def _can_pack() -> bool:
        if _Linear.packed_ok is None:
            try:
                x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
                pk = torch.ops.mkldnn._reorder_linear_weight(w, None)
                y = torch.ops.mkldnn._linear_pointwise(x, pk, b, "none", [], "")
                _Linear.packed_ok = bool(torch.allclose(y, F.linear(x, w, b), atol=1e-4))
            except (RuntimeError, AttributeError):  # a torch built without oneDNN
                _Linear.packed_ok = False
        return _Linear.packed_ok

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype == self.w.dtype:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
        else:
            y = F.linear(x, self.w, self.b)
        if self.lora is not None:
            a, b = self.lora
            y = y + F.linear(F.linear(x.to(a.dtype), a), b)
        return y

    def gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """``gelu(x W^T + b, approximate="tanh")``, fused into the matmul when packed."""
        if self.packed is not None and x.dtype == self.w.dtype and self.lora is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "gelu", [], "tanh")
        return F.gelu(self(x), approximate="tanh")

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + x W^T + b``, fused into the matmul when packed."""
        if self.packed is not None and x.dtype == self.w.dtype and residual.is_contiguous() and self.lora is None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.b, "add")
        return residual + self(x)


def linear_parts(lin) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """(weight, bias, lora) of what a linear layer's forward applies, detached: ``lora`` is None or
    ``(A (r, in), B (out, r))`` whose ``x A^T B^T`` the forward adds (B carries the adapters' scale).

    A layer with plain LoRA adapters (peft) over a float32 weight gives its base weight plus its
    active adapters' ``scale * B A``, folded as merging does: a new tensor, so a runner uses the
    adapters as they are now and the base stays untouched. Over a bfloat16 (or float16) weight
    the adapters stay a low-rank term added after the matmul, as peft's forward adds them: folded
    into a weight that keeps 8 significant bits, a young adapter's update (smaller than half the
    weight's last bit) would be rounded away, and rollouts would come from the base."""
    base = getattr(lin, "base_layer", None)
    if base is None or not hasattr(lin, "get_delta_weight"):
        return lin.weight.detach(), None if getattr(lin, "bias", None) is None else lin.bias.detach(), None
    w = base.weight.detach()
    bias = None if base.bias is None else base.bias.detach()
    names = [n for n in lin.active_adapters if n in lin.lora_A] if not lin.disable_adapters and not lin.merged else []
    for name in names:
        if lin.lora_variant.get(name) is not None or lin.lora_bias.get(name):
            raise ValueError(f"the inference runners apply plain LoRA adapters only, not {name!r}'s variant or bias")
    if not names:
        return w, bias, None
    if w.dtype == torch.float32:
        for name in names:
            w = w + lin.get_delta_weight(name).detach().float()
        return w, bias, None
    a = torch.cat([lin.lora_A[n].weight.detach().float() for n in names])  # (sum r, in)
    b = torch.cat([lin.lora_B[n].weight.detach().float() * lin.scaling[n] for n in names], dim=1)  # (out, sum r)
    return w, bias, (a, b)


def fused_linear(lins, pack: bool) -> "_Linear":
    """One matmul for one linear layer, or for several that read the same input (q/k/v, gate/up):
    their weights stacked, and their adapters one low-rank term (the A's stacked, the B's
    block-diagonal)."""
    parts = [linear_parts(lin) for lin in lins]
    if len(parts) == 1:  # the layer's own weight, not a copy (an LM head is the largest matrix)
        return _Linear(*parts[0][:2], pack, parts[0][2])
    w = torch.cat([w for w, _, _ in parts])
    b = None if parts[0][1] is None else torch.cat([b for _, b, _ in parts])
    lora = None
    if any(lo is not None for _, _, lo in parts):
        f32 = torch.float32
        lora = (torch.cat([lo[0] if lo else wi.new_zeros(0, wi.shape[1], dtype=f32) for wi, _, lo in parts]),
                torch.block_diag(*[lo[1] if lo else wi.new_zeros(wi.shape[0], 0, dtype=f32) for wi, _, lo in parts]))
    return _Linear(w, b, pack, lora)


def _conv1d(conv, pack: bool) -> "_Linear":
    """transformers' Conv1D stores (in, out); a linear layer wants (out, in)."""
    w, b, lora = linear_parts(conv)  # peft's adapters on a Conv1D read (r, in) and write (out, r) too
    return _Linear(w.t(), b, pack, lora)


def check_adapters(model) -> None:
    """The runners read embeddings and norms directly: adapters there would be skipped."""
    for name, m in model.named_modules():
        if getattr(m, "lora_embedding_A", None):
            raise ValueError(f"the inference runners cannot apply LoRA adapters on the embedding {name!r}")


_ACTS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def gpt2_supported(model) -> bool:
    cfg = model.config
    return (type(model).__name__ == "GPT2LMHeadModel" and getattr(cfg, "activation_function", "") in _ACTS
            and not getattr(cfg, "add_cross_attention", False))


class GPT2Runner:
    """GPT-2's forward pass over the slot cache, on the model's own weights (not a copy)."""

    def __init__(self, model, max_slots: int, max_len: int, pack: bool = True):
        cfg = model.config
        tr = model.transformer
        self.device = tr.wte.weight.device
        self.dtype = tr.wte.weight.dtype
        self.C, self.H = cfg.n_embd, cfg.n_head
        self.D = self.C // self.H
        self.eps = cfg.layer_norm_epsilon
        self.max_slots, self.max_len = max_slots, min(max_len, cfg.n_positions)
        self.act = _ACTS[cfg.activation_function]
        self.tanh_gelu = cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
        self.wte, self.wpe = tr.wte.weight.detach(), tr.wpe.weight.detach()
        self.ln_f = (tr.ln_f.weight.detach(), tr.ln_f.bias.detach())
        self.blocks = []
        for i, b in enumerate(tr.h):
            scale = 1.0 / math.sqrt(self.D) if cfg.scale_attn_weights else 1.0
            if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
                scale /= float(i + 1)
            self.blocks.append(dict(
                ln1=(b.ln_1.weight.detach(), b.ln_1.bias.detach()),
                qkv=_conv1d(b.attn.c_attn, pack),
                proj=_conv1d(b.attn.c_proj, pack),
                ln2=(b.ln_2.weight.detach(), b.ln_2.bias.detach()),
                fc=_conv1d(b.mlp.c_fc, pack),
                out=_conv1d(b.mlp.c_proj, pack),
                scale=scale))
        self.lm_head = fused_linear((model.lm_head,), pack)
        L = len(self.blocks)
        shape = (L, max_slots, self.H, self.max_len, self.D)
        self.K = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.V = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.keep_hidden, self.hidden = False, None

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits of the final hidden states ``h`` (kept in ``hidden`` when asked)."""
        if self.keep_hidden:
            self.hidden = h
        return self.lm_head(h).float()

    def _ln(self, x, wb):
        return F.layer_norm(x, (self.C,), wb[0], wb[1], self.eps)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slot0: int) -> torch.Tensor:
        ids, lens = _right_padded(prompts, 0, self.device)
        b, T = ids.shape
        C, H, D = self.C, self.H, self.D
        x = self.wte[ids] + self.wpe[:T]  # (b, T, C)
        for li, blk in enumerate(self.blocks):
            h = self._ln(x, blk["ln1"]).view(b * T, C)
            q, k, v = blk["qkv"](h).view(b, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (b, H, T, D)
            self.K[li, slot0:slot0 + b, :, :T] = k
            self.V[li, slot0:slot0 + b, :, :T] = v
            # right padding: a real position only attends to earlier real positions (causal)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=blk["scale"])  # (b, H, T, D)
            x = x + blk["proj"](a.transpose(1, 2).reshape(b * T, C)).view(b, T, C)
            h = self._ln(x, blk["ln2"]).view(b * T, C)
            x = x + blk["out"](self.act(blk["fc"](h))).view(b, T, C)
        last = x[torch.arange(b, device=self.device), lens - 1]  # (b, C)
        return self._logits(self._ln(last, self.ln_f))  # (b, V)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        C, H, D = self.C, self.H, self.D
        T = int(positions.max()) + 1
        rows = torch.arange(n, device=self.device)
        mask = _decode_mask(positions, T, self.dtype)  # (n, 1, 1, T)
        x = self.wte[tokens] + self.wpe[positions]  # (n, C)
        for li, blk in enumerate(self.blocks):
            q, k, v = blk["qkv"](self._ln(x, blk["ln1"])).view(n, 3, H, D).unbind(1)  # each (n, H, D)
            self.K[li, rows, :, positions] = k
            self.V[li, rows, :, positions] = v
            a = F.scaled_dot_product_attention(q.unsqueeze(2), self.K[li, :n, :, :T], self.V[li, :n, :, :T],
                                               attn_mask=mask, scale=blk["scale"])  # (n, H, 1, D)
            x = blk["proj"].plus(a.reshape(n, C), x)  # x + attention projection
            h = self._ln(x, blk["ln2"])
            h = blk["fc"].gelu_tanh(h) if self.tanh_gelu else self.act(blk["fc"](h))  # (n, 4C)
            x = blk["out"].plus(h, x)
        return self._logits(self._ln(x, self.ln_f))  # (n, V)

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.K[:, dst, :, :length] = self.K[:, src, :, :length]
        self.V[:, dst, :, :length] = self.V[:, src, :, :length]


def llama_supported(model) -> bool:
    cfg = model.config
    rope = (getattr(cfg, "rope_scaling", None) or {}).get("rope_type", "default")
    return (type(model).__name__ == "LlamaForCausalLM" and getattr(cfg, "hidden_act", "") in ("silu", "swish")
            and rope in ("default", "linear", "llama3")  # position-only tables (not dynamic NTK)
            and getattr(cfg, "pretraining_tp", 1) == 1)


class LlamaRunner:
    """Llama's forward pass over the slot cache, on the model's own weights (fused copies of q/k/v
    and gate/up, packed for oneDNN)."""

    def __init__(self, model, max_slots: int, max_len: int, pack: bool = True):
        cfg = model.config
        m = model.model
        self.device = m.embed_tokens.weight.device
        self.dtype = m.embed_tokens.weight.dtype
        self.C = cfg.hidden_size
        self.H, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or self.C // self.H
        self.eps = cfg.rms_norm_eps
        self.max_slots, self.max_len = max_slots, min(max_len, cfg.max_position_embeddings)
        self.scale = 1.0 / math.sqrt(self.D)
        self.embed = m.embed_tokens.weight.detach()
        self.norm = m.norm.weight.detach()
        self.blocks = []
        for layer in m.layers:
            a, f = layer.self_attn, layer.mlp

            self.blocks.append(dict(
                ln1=layer.input_layernorm.weight.detach(), ln2=layer.post_attention_layernorm.weight.detach(),
                qkv=fused_linear((a.q_proj, a.k_proj, a.v_proj), pack), o=fused_linear((a.o_proj,), pack),
                gate_up=fused_linear((f.gate_proj, f.up_proj), pack),
                down=fused_linear((f.down_proj,), pack)))
        self.I = cfg.intermediate_size
        self.lm_head = fused_linear((model.lm_head,), pack)
        with torch.no_grad():  # cos/sin of every position, from the model's own rotary module
            pos = torch.arange(self.max_len, device=self.device)[None]
            cos, sin = m.rotary_emb(self.embed[:1][None], pos)
        self.cos, self.sin = cos[0], sin[0]  # (max_len, D)
        shape = (len(self.blocks), max_slots, self.Hkv, self.max_len, self.D)
        self.K = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.V = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.keep_hidden, self.hidden = False, None

    _logits = GPT2Runner._logits

    def _rms(self, x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @staticmethod
    def _rope(x, cos, sin):
        """x (..., heads, D) rotated by cos/sin (..., 1, D)."""
        h = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin

    def _split(self, qkv, lead: tuple):
        H, Hkv, D = self.H, self.Hkv, self.D
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        return q.view(*lead, H, D), k.view(*lead, Hkv, D), v.view(*lead, Hkv, D)

    def _mlp(self, blk, h):
        g, u = blk["gate_up"](h).split(self.I, dim=-1)
        return F.silu(g) * u

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slot0: int) -> torch.Tensor:
        ids, lens = _right_padded(prompts, 0, self.device)
        b, T = ids.shape
        C = self.C
        x = self.embed[ids]  # (b, T, C)
        cos, sin = self.cos[:T][None, :, None, :], self.sin[:T][None, :, None, :]  # (1, T, 1, D)
        for li, blk in enumerate(self.blocks):
            q, k, v = self._split(blk["qkv"](self._rms(x, blk["ln1"]).view(b * T, C)), (b, T))  # (b, T, heads, D)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, heads, T, D)
            self.K[li, slot0:slot0 + b, :, :T] = k
            self.V[li, slot0:slot0 + b, :, :T] = v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            x = blk["o"].plus(a.transpose(1, 2).reshape(b * T, self.H * self.D), x.reshape(b * T, C)).view(b, T, C)
            h = self._rms(x, blk["ln2"]).view(b * T, C)
            x = blk["down"].plus(self._mlp(blk, h), x.reshape(b * T, C)).view(b, T, C)
        last = x[torch.arange(b, device=self.device), lens - 1]  # (b, C)
        return self._logits(self._rms(last, self.norm))  # (b, V)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        T = int(positions.max()) + 1
        rows = torch.arange(n, device=self.device)
        mask = _decode_mask(positions, T, self.dtype)  # (n, 1, 1, T)
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]  # (n, 1, D)
        x = self.embed[tokens]  # (n, C)
        for li, blk in enumerate(self.blocks):
            q, k, v = self._split(blk["qkv"](self._rms(x, blk["ln1"])), (n,))  # (n, heads, D)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            self.K[li, rows, :, positions] = k
            self.V[li, rows, :, positions] = v
            a = F.scaled_dot_product_attention(q.unsqueeze(2), self.K[li, :n, :, :T], self.V[li, :n, :, :T],
                                               attn_mask=mask, scale=self.scale, enable_gqa=True)  # (n, H, 1, D)
            x = blk["o"].plus(a.reshape(n, self.H * self.D), x)
            x = blk["down"].plus(self._mlp(blk, self._rms(x, blk["ln2"])), x)
        return self._logits(self._rms(x, self.norm))  # (n, V)

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.K[:, dst, :, :length] = self.K[:, src, :, :length]
        self.V[:, dst, :, :length] = self.V[:, src, :, :length]


class HFRunner:
    """Any Hugging Face causal LM through its own forward; the slot cache is allocated at the
    first prefill, from the shapes of the keys/values the model returns."""

    def __init__(self, model, max_slots: int, max_len: int, pad_token_id: int = 0):
        self.model = model
        self.device = next(model.parameters()).device
        self.max_slots = max_slots
        ctx = context_length(model.config)
        self.max_len = min(max_len, ctx) if ctx else max_len
        self.pad = pad_token_id
        self.K: list[torch.Tensor] = []
        self.V: list[torch.Tensor] = []
        self.keep_hidden, self.hidden = False, None

    @staticmethod
    def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        if hasattr(cache, "to_legacy_cache"):
            return list(cache.to_legacy_cache())
        return list(cache)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slot0: int) -> torch.Tensor:
        ids, lens = _right_padded(prompts, self.pad, self.device)
        b, T = ids.shape
        mask = (torch.arange(T, device=self.device)[None, :] < lens[:, None]).long()  # (b, T)
        pos = torch.arange(T, device=self.device).expand(b, T)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         output_hidden_states=self.keep_hidden)
        if self.keep_hidden:
            self.hidden = out.hidden_states[-1][torch.arange(b, device=self.device), lens - 1]  # (b, C)
        kv = self._layers(out.past_key_values)
        if not self.K:
            for k, _ in kv:  # (b, Hkv, T, D)
                shape = (self.max_slots, k.shape[1], self.max_len, k.shape[3])
                self.K.append(torch.zeros(shape, dtype=k.dtype, device=self.device))
                self.V.append(torch.zeros(shape, dtype=k.dtype, device=self.device))
        for li, (k, v) in enumerate(kv):
            self.K[li][slot0:slot0 + b, :, :T] = k
            self.V[li][slot0:slot0 + b, :, :T] = v
        return out.logits[torch.arange(b, device=self.device), lens - 1].float()  # (b, V)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from transformers.cache_utils import DynamicCache

        n = tokens.shape[0]
        T = int(positions.max())  # cache positions written so far by the longest row
        cache = DynamicCache(ddp_cache_data=[(K[:n, :, :T], V[:n, :, :T]) for K, V in zip(self.K, self.V)])
        ar = torch.arange(T + 1, device=self.device)
        mask = ((ar[None, :] < positions[:, None]) | (ar[None, :] == T)).long()  # (n, T+1): holes hidden
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                         past_key_values=cache, use_cache=True, output_hidden_states=self.keep_hidden)
        if self.keep_hidden:
            self.hidden = out.hidden_states[-1][:, -1]  # (n, C)
        rows = torch.arange(n, device=self.device)
        for li, (k, v) in enumerate(self._layers(out.past_key_values)):
            self.K[li][rows, :, positions] = k[:, :, T]
            self.V[li][rows, :, positions] = v[:, :, T]
        return out.logits[:, -1].float()  # (n, V)

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int, length: int) -> None:
        for K, V in zip(self.K, self.V):
            K[dst, :, :length] = K[src, :, :length]
            V[dst, :, :length] = V[src, :, :length]


def make_runner(model, max_slots: int, max_len: int, pad_token_id: int = 0, kind: str = "auto") -> Runner:
    """:class:`GPT2Runner` for GPT-2 models and :class:`LlamaRunner` for Llama models (``kind="auto"``,
    or ``"gpt2"`` / ``"llama"``), else :class:`HFRunner`. A model with LoRA adapters (peft) runs
    as the model it wraps: the packed runners apply the adapters as they are now (folded into
    their copy of a float32 weight, beside a lower-precision one: :func:`linear_parts`);
    :class:`HFRunner` runs the adapted modules themselves."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
        check_adapters(model)
    if kind == "llama" or (kind == "auto" and llama_supported(model)):
        if not llama_supported(model):
            raise ValueError(f"the Llama runner needs a Llama model with static rotary embeddings, got {type(model).__name__}")
        return LlamaRunner(model, max_slots, max_len)
    if kind == "hf" or (kind == "auto" and not gpt2_supported(model)):
        return HFRunner(model, max_slots, max_len, pad_token_id)
    if not gpt2_supported(model):
        raise ValueError(f"the fast runner needs a GPT-2 model, got {type(model).__name__}")
    return GPT2Runner(model, max_slots, max_len)
