"""Training across processes with torch.distributed: the process group, each rank's share of a
batch, the model wrappers (DDP, FSDP2) and the few collectives the recipes need.

``torchrun --nproc-per-node N rlhf train ...`` (or the trainer's launcher) starts N processes
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous endpoint in their environment;
:func:`setup` joins them (gloo on the CPU, NCCL on GPUs). Without those variables there is one
process, and everything here is the identity or a no-op: the recipes have one code path.

**The global batch.** A config's batch size counts the whole step's sequences (or comparisons, or
rollouts), whatever the number of processes. Rank r takes rows r, r + W, r + 2W, ... of each
batch (:meth:`World.share`). A loss that is a mean over the batch's units (tokens, prompts,
pairs) is computed on each rank as ``(sum over its units) / (units of the whole batch) * W``:
DDP and FSDP average gradients over the W ranks, so the step is the gradient of the whole batch's
mean, as one process would take it. A rank whose share of a short last batch is empty runs one
row with weight 0, so every rank joins every collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, Literal, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from rlhf.config import Range, count
from rlhf.errors import ConfigError

T = TypeVar("T")
Strategy = Literal["ddp", "fsdp"]
TIMEOUT = timedelta(minutes=30)  # a collective waits this long for a slow rank (a checkpoint, an eval)


@dataclass
class DistributedConfig:
    """How many processes train the job, and how they share the model."""

    strategy: Strategy = "ddp"  # ddp: every process holds the whole model; fsdp: FSDP2 (fully_shard) shards parameters, gradients and optimizer state across processes
    processes: int = 1  # trainer: processes per node (torchrun --nproc-per-node); `rlhf train` takes torchrun's own
    nodes: int = 1  # trainer on Kubernetes: pods of the Indexed Job, one per node (torchrun --nnodes); 1 elsewhere
    gpus_per_process: int = 0  # trainer on Kubernetes: nvidia.com/gpu each process needs (a pod requests processes x this); 0: CPU pods

    LIMITS: ClassVar[dict[str, Range]] = {"processes": count(1, 1024), "nodes": count(1, 4096),
                                          "gpus_per_process": count(0, 16)}

    @property
    def world_size(self) -> int:
        return self.processes * self.nodes


@dataclass
class World:
    """This process's place among the job's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes versions, logs and metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # -- shares of a batch ----------------------------------------------------------------------

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's rows of a global batch: r, r + W, r + 2W, ..."""
        return list(items[self.rank :: self.size])

    def share_or_first(self, items: Sequence[T]) -> tuple[list[T], float]:
        """(rows, weight): this rank's share with weight 1, or, when it is empty, the first row
        with weight 0 (the rank still runs forward and backward, contributing nothing)."""
        mine = self.share(items)
        return (mine, 1.0) if mine else (list(items[:1]), 0.0)

    # -- collectives (identities in one process) --------------------------------------------------

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``x`` (a new tensor; gradients do not flow through it)."""
        if not self.distributed:
            return x
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    def max_int(self, v: int) -> int:
        if not self.distributed:
            return v
        t = torch.tensor([v], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Average the gradients of ``params`` over the ranks in place, as DDP does after backward
        (one all-reduce of all of them, flattened). For training loops that call several modules
        per step (PPO: policy, value head, critic, PPO-ptx), where one DDP wrapper does not fit."""
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.size
        i = 0
        for g in grads:
            g.copy_(flat[i : i + g.numel()].view_as(g))
            i += g.numel()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # -- models -----------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, strategy: Strategy) -> nn.Module:
        """The module the training step calls: ``model`` itself in one process, DDP around it, or
        ``model`` with FSDP2 applied (each transformer block sharded, then the root)."""
        if not self.distributed:
            return model
        if strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in transformer_blocks(model):
                fully_shard(block)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole (unsharded) state dict of ``model`` on rank 0, on the CPU; ``{}`` elsewhere.
        A collective under FSDP: every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not self.distributed:
            return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # a parameter under two names (tied input and output embeddings) is saved once, under its
        # first name, as the model's own state_dict() would be saved by Hugging Face
        first = {n for n, _ in unwrap(model).named_parameters()}
        tied = {n for n, _ in unwrap(model).named_parameters(remove_duplicate=False)} - first
        return {k: v for k, v in sd.items() if k not in tied} if self.main else {}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are not wrapped)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes its ``_no_split_modules`` names),
    the unit FSDP2 shards and gathers one at a time."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"strategy fsdp: {type(model).__name__} names no transformer blocks (_no_split_modules)")
    return blocks


_WORLD: World | None = None


def launched() -> bool:
    """Whether torchrun (or the trainer's launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "cpu") -> World:
    """Join the job's processes (once per process) and return this one's :class:`World`.

    ``device`` is the job's device: ``cpu``, or ``cuda`` / ``cuda:N`` (each rank then takes GPU
    ``LOCAL_RANK`` of its node). gloo on the CPU, NCCL on GPUs.
    """
    global _WORLD
    if not launched():
        return World(device=torch.device(device))
    if _WORLD is not None:
        return _WORLD
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    _WORLD = World(rank=rank, size=size, local_rank=local,
                   device=torch.device(f"cuda:{local}") if cuda else torch.device(device))
    return _WORLD


def shutdown() -> None:
    """Leave the process group (at the end of a process that called :func:`setup`)."""
    global _WORLD
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = None
