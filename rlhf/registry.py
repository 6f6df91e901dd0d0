"""The model registry: a directory of immutable model versions (DESIGN.md, "Parts").

Layout::

    <root>/policy/<version>/   a causal LM in Hugging Face format + manifest.json
    <root>/reward/<version>/   a reward model (rlhf.models.RewardModel.save) + manifest.json
    <root>/dataset/<version>/  pre-training text for PPO-ptx (texts.jsonl, {"text"} per line) + manifest.json

A version is written into a hidden temporary directory and renamed into place, so a reader never
sees a half-written version, and it is never modified afterwards. Version ids sort by creation
time (``v<UTC timestamp>-<random>``). The manifest records the parent version, the job, the data
snapshot, the config and the metrics that made it; an imported model's manifest also records its
``source`` (what was imported and its sha256, :mod:`rlhf.model_import`, :func:`import_texts`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from rlhf.errors import DataError, NotFoundError

KINDS = ("policy", "reward", "dataset")
DATASET_TEXTS = "texts.jsonl"  # a dataset version's documents, as rlhf.data.read_texts reads them
MAX_VERSION_CHARS = 200


def _short(version: str) -> str:
    """A version id as an error message quotes it: a huge one is cut, not echoed."""
    return repr(version) if len(version) <= 80 else f"{version[:40]!r}... ({len(version)} characters)"


def new_version_id() -> str:
    t = time.time()
    return time.strftime("v%Y%m%dT%H%M%S", time.gmtime(t)) + f"{int(t * 1e6) % 1_000_000:06d}-{secrets.token_hex(3)}"


@dataclass
class Manifest:
    kind: str
    version: str
    parent_version: str = ""
    job_id: str = ""
    base_model: str = ""
    data: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created_at: float = 0.0
    source: dict = field(default_factory=dict)  # imported models: path/package and sha256 of the source


class ModelRegistry:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        for k in KINDS:
            (self.root / k).mkdir(parents=True, exist_ok=True)

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise DataError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")

    def path(self, kind: str, version: str) -> Path:
        self._check_kind(kind)
        if not version or "/" in version or version.startswith(".") or len(version) > MAX_VERSION_CHARS:
            raise DataError(f"invalid model version id {_short(version)}")
        p = self.root / kind / version
        if not (p / "manifest.json").is_file():
            raise NotFoundError(f"no {kind} {'' if kind == 'dataset' else 'model '}version {_short(version)} in the registry")
        return p

    def manifest(self, kind: str, version: str) -> Manifest:
        return read_manifest(self.path(kind, version))

    def versions(self, kind: str) -> list[str]:
        """All complete versions of a kind, oldest first."""
        self._check_kind(kind)
        return sorted(p.name for p in (self.root / kind).iterdir()
                      if not p.name.startswith(".") and (p / "manifest.json").is_file())

    def latest(self, kind: str) -> str | None:
        v = self.versions(kind)
        return v[-1] if v else None

    def resolve(self, kind: str, ref: str) -> str:
        """``ref`` as a version id of ``kind``: itself, or for ``"latest"`` the newest version.
        Raises NotFoundError when there is none."""
        version = self.latest(kind) if ref == "latest" else ref
        if version is None:
            raise NotFoundError(f"the registry holds no {kind} version yet")
        self.path(kind, version)
        return version

    def texts(self, ref: str) -> list[str]:
        """The documents of dataset version ``ref`` (or ``"latest"``)."""
        from rlhf.data import read_texts

        return read_texts(self.path("dataset", self.resolve("dataset", ref)) / DATASET_TEXTS)

    def publish(self, kind: str, write: Callable[[Path], None], *, parent_version: str = "", job_id: str = "",
                base_model: str = "", data: dict | None = None, config: dict | None = None,
                metrics: dict | None = None, version: str | None = None, source: dict | None = None) -> Manifest:
        """Create a new version: ``write(tmpdir)`` saves the model files, then it appears atomically."""
        self._check_kind(kind)
        version = version or new_version_id()
        return write_version(self.root / kind / version, kind, write, version=version, parent_version=parent_version,
                             job_id=job_id, base_model=base_model, data=data, config=config, metrics=metrics,
                             source=source)


def import_texts(source: str | os.PathLike, registry_dir: str | os.PathLike) -> Manifest:
    """Pre-training text (``source``, any file :func:`rlhf.data.read_texts` reads) as a new dataset
    version of the registry at ``registry_dir``: PPO-ptx in the trainer samples it (``ptx_dataset``).
    The file is read first, so a bad one stores nothing; importing the same bytes again returns
    the existing version."""
    from rlhf.data import read_texts, write_jsonl

    texts = read_texts(source)
    sha = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    registry = ModelRegistry(registry_dir)
    for v in reversed(registry.versions("dataset")):
        if (m := registry.manifest("dataset", v)).source.get("sha256") == sha:
            return m
    return registry.publish("dataset", lambda d: write_jsonl(d / DATASET_TEXTS, ({"text": t} for t in texts)),
                            data={"documents": len(texts), "characters": sum(map(len, texts))},
                            source={"path": os.fspath(source), "sha256": sha})


def write_version(final: str | os.PathLike, kind: str, write: Callable[[Path], None], *, version: str | None = None,
                  parent_version: str = "", job_id: str = "", base_model: str = "", data: dict | None = None,
                  config: dict | None = None, metrics: dict | None = None, source: dict | None = None) -> Manifest:
    """Write one model version into the directory ``final`` with its manifest, atomically.

    ``write(tmpdir)`` saves the model files into a hidden sibling of ``final``, the manifest is
    added, and the directory is renamed into place: a reader never sees a half-written version.
    The registry's versions and ``rlhf train``'s outputs are both written here, so every version
    carries the same manifest. ``final`` must not exist, or be an empty directory.
    """
    final = Path(final)
    if kind not in KINDS:
        raise DataError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise DataError(f"{final} already exists and is not empty: model versions are immutable")
    version = version or new_version_id()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{secrets.token_hex(3)}"
    tmp.mkdir()
    try:
        write(tmp)
        check_written(tmp, metrics or {})
        m = Manifest(kind=kind, version=version, parent_version=parent_version, job_id=job_id,
                     base_model=base_model, data=data or {}, config=config or {},
                     metrics={k: float(v) for k, v in (metrics or {}).items()}, created_at=time.time(),
                     source=source or {})
        (tmp / "manifest.json").write_text(json.dumps(asdict(m), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, final)  # an empty directory at ``final`` is replaced too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return m


def check_written(d: Path, metrics: dict) -> None:
    """Refuse a version whose weights or final metrics are not finite: a NaN model must never
    be published (the servers would answer NaN). Every ``*.safetensors`` file is read back."""
    from safetensors import safe_open

    from rlhf.models import check_finite

    bad = [k for k, v in metrics.items() if not math.isfinite(float(v))]
    if bad:
        raise DataError(f"refusing to publish: non-finite final metrics {', '.join(sorted(bad))}")
    for f in sorted(d.rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            check_finite(((k, st.get_tensor(k)) for k in st.keys()), f"refusing to publish: {f.name}")


def read_manifest(path: str | os.PathLike) -> Manifest | None:
    """The manifest of a version directory (registry or ``rlhf train`` output), or None without one."""
    f = Path(path) / "manifest.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    return Manifest(**{k: v for k, v in data.items() if k in Manifest.__dataclass_fields__})
