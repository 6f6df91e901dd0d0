"""KL penalty coefficient controllers.

Seed 002 (Ziegler et al., 2019, section 2.2), the log-space proportional controller:

    e_t      = clip( (KL(pi_t, rho) - KL_target) / KL_target, -0.2, 0.2 )
    beta_t+1 = beta_t * (1 + K_beta * e_t),      K_beta = 0.1

The KL fed in is the mean over the batch of sum_t log(pi/rho) over a response (nats per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdaptiveKLController:
    beta: float
    target: float
    k_beta: float = 0.1
    clip: float = 0.2

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError("the initial KL coefficient beta must be >= 0")
        if self.target <= 0:
            raise ValueError("kl target must be > 0 (use a fixed beta to run without a target)")

    def update(self, kl: float) -> float:
        """Feed the KL measured at step t; returns beta_{t+1}."""
        e = min(max((kl - self.target) / self.target, -self.clip), self.clip)
        self.beta = self.beta * (1.0 + self.k_beta * e)
        return self.beta


@dataclass
class FixedKLController:
    beta: float

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError("the KL coefficient beta must be >= 0")

    def update(self, kl: float) -> float:  # noqa: ARG002 - same interface as the adaptive one
        return self.beta


def make_kl_controller(beta: float, target: float | None, adaptive: bool = True):
    """An adaptive controller when a target is given and ``adaptive``; a fixed beta otherwise."""
    if adaptive and target is not None:
        return AdaptiveKLController(beta=beta, target=target)
    return FixedKLController(beta=beta)
