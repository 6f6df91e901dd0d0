"""A tiny Llama (RoPE, grouped-query attention, RMSNorm) with a chat tokenizer, built from a config
in a second, and a GGUF writer for it (llama.cpp's tensor names and its q/k row order), so that
the import, serving and LoRA tests exercise the real model's architecture without the real model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rlhf.models import save_pretrained, train_tokenizer

# SmolLM2-Instruct's template (ChatML with a default system message), as its GGUF file carries it
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

WORDS = ("the a sea is blue and calm write short poem about answer in at most words include word "
         "sun light ocean wave wind sky night star good day water ship sail home").split()
TEXTS = [" ".join(WORDS[(i * 7 + j * 5) % len(WORDS)] for j in range(14)) + "." for i in range(300)]


def chat_tokenizer(vocab_size: int = 320):
    """Byte-level BPE with ChatML's special tokens: <|endoftext|> (0), <|im_start|> (BOS),
    <|im_end|> (EOS and padding), and the chat template."""
    tok = train_tokenizer(TEXTS, vocab_size)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token = "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.clean_up_tokenization_spaces = False
    return tok


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, tie: bool = True):
    """LlamaForCausalLM: 4 query heads sharing 2 key/value heads, head_dim 8, RoPE, RMSNorm; the
    weights get noise on top of the initialisation so that greedy decoding does not repeat."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, attention_dropout=0.0)
    m = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def llama_dir(path: Path, seed: int = 0, manifest: dict | None = None) -> Path:
    tok = chat_tokenizer()
    save_pretrained(tiny_llama(len(tok), seed), tok, path, manifest=manifest)
    return path


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path: Path, *, add_bos: bool = False) -> Path:
    """Write ``model`` (a LlamaForCausalLM) and ``tokenizer`` (byte-level BPE) as a float32 GGUF file."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_ids)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(tokenizer.chat_template)

    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_qk(sd[p + "self_attn.q_proj.weight"], H))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_qk(sd[p + "self_attn.k_proj.weight"], Hkv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_IMPORTED: dict[str, Path] = {}


def smollm2_registry(tmp_path_factory) -> Path:
    """A registry holding SmolLM2-135M-Instruct imported from its package, once per test run
    (under RLHF_TEST_MODEL_CACHE when set, so that runs can share it); skips without the package."""
    import os

    import pytest

    from rlhf.errors import ModelNotFoundError
    from rlhf.model_import import import_model, resolve_source

    if "smollm2" not in _IMPORTED:
        try:
            resolve_source("smollm2")
        except ModelNotFoundError as e:
            pytest.skip(str(e))
        root = Path(os.environ.get("RLHF_TEST_MODEL_CACHE") or tmp_path_factory.mktemp("smollm2")) / "registry"
        import_model("smollm2", root)
        _IMPORTED["smollm2"] = root
    return _IMPORTED["smollm2"]

