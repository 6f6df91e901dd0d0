"""Masked reductions and advantage whitening, shared by the PPO losses."""

from __future__ import annotations

import torch

from rlhf.distributed import World


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           world: World | None = None) -> torch.Tensor:
    """Normalise the masked entries of ``x`` to zero mean and unit variance (masked entries -> 0).
    ``world``: the mean and variance of every rank's entries together (:mod:`rlhf.distributed`)."""
    if world is not None and world.distributed:
        mean, var = _global_mean_var(x, mask.to(x.dtype), world)
    else:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def _global_mean_var(x: torch.Tensor, mask: torch.Tensor, world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """masked_mean and (unbiased) masked_var over the entries of all ranks: two all-reduces."""
    s = world.sum(torch.stack([(x * mask).sum(), mask.sum()]).double())
    n = s[1].clamp(min=1.0)
    mean = (s[0] / n).to(x.dtype)
    ss = world.sum(((x - mean) ** 2 * mask).sum().double())
    var = ss / n
    if s[1] > 1:
        var = var * s[1] / (s[1] - 1)
    return mean, var.to(x.dtype)
