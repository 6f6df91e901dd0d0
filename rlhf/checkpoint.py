"""Checkpoints of a training job, and how a job stops: cancelled, or interrupted (SIGTERM) with a
checkpoint to resume from.

A checkpoint is a directory ``step-NNNNNNNN/`` inside the job's checkpoint directory::

    meta.json        step, kind, world size, strategy and the job's config
    shared.pt        the model(s) and the optimizer (whole, unsharded: any strategy reads them),
                     and the loop's state: data cursor, metrics history, KL coefficient, ...
    rank-00000.pt    each rank's own state: torch's, CUDA's, Python's and NumPy's RNG states and
    rank-00001.pt    the loop's generators (a rank's rollout sampler, ...)

written into a hidden ``.tmp-step-NNNNNNNN`` directory by all ranks and renamed into place by
rank 0 once every rank's file is complete; the ``latest`` file then names it (replaced
atomically too). A process killed at any moment leaves the previous checkpoint whole, and the
``keep`` newest are kept. The directory must be one that every rank sees (a shared volume across
nodes: the registry's).

Resuming loads the model, the optimizer, the loop's state and every RNG, so on the CPU an
interrupted and resumed run ends with the same weights as an uninterrupted one, bit for bit.

Stopping: after every optimizer step the ranks agree (one all-reduce) on whether to go on. Rank 0
asks its :class:`~rlhf.train.JobIO` whether the job was cancelled; any rank may have received
SIGTERM (a preempted node, ``kubectl delete``, the trainer shutting down). Cancelled: every rank
raises (rank 0 its IO's own error). Preempted: every rank writes its part of a checkpoint at
that step, then raises :class:`Interrupted`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn as nn

from rlhf.config import Range, count
from rlhf.distributed import World
from rlhf.errors import ConfigError

LATEST = "latest"
META = "meta.json"
SHARED = "shared.pt"
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: interrupted with a checkpoint; run again to resume


@dataclass
class CheckpointConfig:
    """When and where a job writes checkpoints."""

    every_steps: int = 100  # a checkpoint every this many optimizer steps (PPO: PPO steps), and always on SIGTERM; 0: only on SIGTERM
    keep: int = 2  # newest checkpoints kept; older ones are deleted once a newer one is complete
    directory: str = ""  # rlhf train: where (empty: OUTPUT.checkpoints beside the output); the trainer keeps a job's in its registry, under checkpoints/<job id>

    LIMITS: ClassVar[dict[str, Range]] = {"every_steps": count(0, 10**9), "keep": count(1, 1000)}


class Interrupted(Exception):
    """The job stopped on SIGTERM after writing a checkpoint at ``step``: run it again to resume."""

    def __init__(self, step: int, directory: Path | None):
        self.step, self.directory = step, directory
        where = f"; checkpoint in {directory}" if directory else " (no checkpoint directory)"
        super().__init__(f"interrupted at step {step}{where}")


class Stopped(Exception):
    """Another rank stopped the job (rank 0 found it cancelled)."""


# -- SIGTERM ---------------------------------------------------------------------------------------

_PREEMPTED = threading.Event()


def install_preemption_handler() -> None:
    """On SIGTERM, finish the current step, write a checkpoint and stop (:class:`Interrupted`).
    Called by the processes that run a job (``rlhf train``, the trainer's job process)."""
    signal.signal(signal.SIGTERM, lambda *_: _PREEMPTED.set())


def preempted() -> bool:
    return _PREEMPTED.is_set()


# -- random number generators ----------------------------------------------------------------------

def rng_states() -> dict[str, Any]:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_states(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# -- the directory ---------------------------------------------------------------------------------

def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    """Write ``path`` atomically (a temporary sibling renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class Loaded:
    step: int
    meta: dict
    shared: dict  # model, optimizer and the loop's shared state
    local: dict  # this rank's RNG states and generators
    path: Path


class Checkpoints:
    """One job's checkpoint directory (see the module's docstring for its layout)."""

    def __init__(self, directory: str | os.PathLike, world: World | None = None, keep: int = 2):
        self.directory = Path(directory)
        self.world = world or World()
        self.keep = keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint, if any."""
        f = self.directory / LATEST
        if not f.is_file():
            return None
        p = self.directory / f.read_text().strip()
        return p if (p / META).is_file() else None

    def meta(self) -> dict | None:
        p = self.latest()
        return json.loads((p / META).read_text()) if p else None

    def forget_inputs(self) -> None:
        """Remove the inputs a run pinned (:meth:`Checkpointing.pinned`) before it wrote any checkpoint."""
        for f in self.directory.glob("inputs-*.pt"):
            f.unlink()

    def save(self, step: int, modules: nn.Module, optimizer: torch.optim.Optimizer | None, shared: dict,
             local: dict, meta: dict) -> Path:
        """Write the checkpoint of ``step`` (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        w = self.world
        opts = StateDictOptions(full_state_dict=True, cpu_offload=w.distributed)
        if optimizer is not None:
            msd, osd = get_state_dict(modules, optimizer, options=opts)
        else:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            msd, osd = get_model_state_dict(modules, options=opts), None
        name = _step_name(step)
        tmp = self.directory / f".tmp-{name}"
        if w.main:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while writing it
            tmp.mkdir()
        w.barrier()
        _save({"rng": rng_states(), **local}, tmp / f"rank-{w.rank:05d}.pt")
        if w.main:
            _save({"model": msd, "optimizer": osd, **shared}, tmp / SHARED)
            _write_text(tmp / META, json.dumps({"step": step, "world_size": w.size, "time": time.time(), **meta},
                                               indent=1, sort_keys=True, default=str) + "\n")
        w.barrier()
        final = self.directory / name
        if w.main:
            if final.exists():  # the same step written again after a resume from an older one
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_text(self.directory / LATEST, name + "\n")
            self._prune(final)
        w.barrier()
        return final

    def _prune(self, newest: Path) -> None:
        done = sorted(p for p in self.directory.glob("step-*") if p.is_dir() and p != newest)
        for p in done[: max(0, len(done) - (self.keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)

    def load(self) -> Loaded | None:
        """This rank's view of the newest checkpoint, or None when there is none."""
        p = self.latest()
        if p is None:
            return None
        meta = json.loads((p / META).read_text())
        if meta["world_size"] != self.world.size:
            raise ConfigError(f"checkpoint {p} was written by {meta['world_size']} process(es); resume it with as many "
                              f"(this run has {self.world.size}): every rank's random state is part of it")
        shared = torch.load(p / SHARED, map_location="cpu", weights_only=False)
        local = torch.load(p / f"rank-{self.world.rank:05d}.pt", map_location="cpu", weights_only=False)
        return Loaded(step=int(meta["step"]), meta=meta, shared=shared, local=local, path=p)

    @staticmethod
    def apply(loaded: Loaded, modules: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Load the checkpoint's model(s), optimizer and RNG states into this rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

        opts = StateDictOptions(full_state_dict=True)
        if optimizer is not None:
            set_state_dict(modules, optimizer, model_state_dict=loaded.shared["model"],
                           optim_state_dict=loaded.shared["optimizer"], options=opts)
        else:
            set_model_state_dict(modules, loaded.shared["model"], options=opts)
        set_rng_states(loaded.local["rng"])


class Checkpointing:
    """What a training loop calls: :meth:`restore` once before its first step, :meth:`after_step`
    after each optimizer step. Holds the stop agreement described in the module's docstring."""

    def __init__(self, store: Checkpoints | None, every: int, meta: dict, check: Callable[[], None] | None = None,
                 world: World | None = None):
        self.store, self.every, self.meta, self.check = store, every, meta, check
        self.world = world or (store.world if store is not None else World())
        self.resumed_from: Loaded | None = None

    def pinned(self, name: str, fetch: Callable[[], Any]) -> Any:
        """The job's input ``name`` (its data, the model versions it starts from): ``fetch()`` on
        rank 0 the first time, shared with every rank, and kept in the checkpoint directory, so
        that a resumed run trains on what the interrupted one did (a service's export, or the
        registry's latest version, may have changed since)."""
        f = self.store.directory / f"inputs-{name}.pt" if self.store is not None else None
        if f is not None and f.is_file():
            return torch.load(f, map_location="cpu", weights_only=False)
        value = self.world.broadcast(fetch() if self.world.main else None)
        if f is not None and self.world.main:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f".{f.name}.tmp")
            _save(value, tmp)
            os.replace(tmp, f)
        return value

    def restore(self, modules: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict | None:
        """The loop's state at the newest checkpoint (its model, optimizer and RNGs loaded), or
        None to start afresh. Keys: those the loop saved, shared and its rank's own, and ``step``."""
        loaded = self.store.load() if self.store is not None else None
        if loaded is None:
            return None
        if loaded.meta.get("kind") != self.meta.get("kind"):
            raise ConfigError(f"checkpoint {loaded.path} is of a {loaded.meta.get('kind')} job, not {self.meta.get('kind')}")
        then, now = (({k: v for k, v in (m.get("job") or {}).items() if k not in ("checkpoint", "output")}) for m in (loaded.meta, self.meta))
        if then != now:
            changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
            raise ConfigError(f"checkpoint {loaded.path} was written with another config ({', '.join(changed)} differ): "
                              "an exact resume needs the same job")
        Checkpoints.apply(loaded, modules, optimizer)
        self.resumed_from = loaded
        state = {k: v for k, v in loaded.shared.items() if k not in ("model", "optimizer")}
        return {**state, **{k: v for k, v in loaded.local.items() if k != "rng"}, "step": loaded.step}

    def after_step(self, step: int, modules: nn.Module, optimizer: torch.optim.Optimizer | None,
                   state: Callable[[], tuple[dict, dict]]) -> None:
        """Agree on stopping; write a checkpoint when one is due or the job is interrupted.
        ``state()`` returns (the loop's shared state, this rank's own)."""
        code, error = 0, None
        if self.world.main and self.check is not None:
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - the IO's cancellation, re-raised below
                code, error = 2, e
        if preempted():
            code = max(code, 1)
        code = self.world.max_int(code)
        if code == 2:
            if error is not None:
                raise error
            raise Stopped("rank 0 stopped the job")
        due = self.every > 0 and step % self.every == 0
        if self.store is not None and (code == 1 or due):
            shared, local = state()
            self.store.save(step, modules, optimizer, shared, local, self.meta)
        if code == 1:
            raise Interrupted(step, self.store.directory if self.store is not None else None)
