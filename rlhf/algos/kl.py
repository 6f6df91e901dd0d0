"""KL penalty coefficient controllers.

Seed 002 (Ziegler et al., 2019, section 2.2), the log-space proportional controller:

    e_t      = clip( (KL(pi_t, rho) - KL_target) / KL_target, -0.2, 0.2 )
    beta_t+1 = beta_t * (1 + K_beta * e_t),      K_beta = 0.1

That is the default: one update of K_beta per PPO step, whatever the step's batch size. Ziegler
et al.'s reference code (lm-human-preferences, and TRL after it) scales the step by the episodes
it saw instead: beta_t+1 = beta_t * (1 + e_t * n_steps / horizon), n_steps the rollouts of the
step and horizon 10,000 episodes there, so that runs at different batch sizes move beta alike
per episode (a step of 512 rollouts then has an effective K_beta of 0.0512). ``horizon`` selects that
form.

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
    horizon: int | None = None  # None: K_beta per step (the seed); else n_steps / horizon per step

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError("the initial KL coefficient beta must be >= 0")
        if self.target <= 0:
            raise ValueError("kl target must be > 0 (use a fixed beta to run without a target)")
        if self.horizon is not None and self.horizon < 1:
            raise ValueError("the KL horizon must be >= 1 episode")

    def update(self, kl: float, n_steps: int = 1) -> float:
        """Feed the KL measured at step t over ``n_steps`` rollouts; returns beta_{t+1}."""
        e = min(max((kl - self.target) / self.target, -self.clip), self.clip)
        gain = self.k_beta if self.horizon is None else n_steps / self.horizon
        self.beta = self.beta * (1.0 + gain * e)
        return self.beta


@dataclass
class FixedKLController:
    beta: float

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError("the KL coefficient beta must be >= 0")

    def update(self, kl: float, n_steps: int = 1) -> float:  # noqa: ARG002 - same interface as the adaptive one
        return self.beta


def make_kl_controller(beta: float, target: float | None, adaptive: bool = True, horizon: int | None = None):
    """An adaptive controller when a target is given and ``adaptive``; a fixed beta otherwise."""
    if adaptive and target is not None:
        return AdaptiveKLController(beta=beta, target=target, horizon=horizon)
    return FixedKLController(beta=beta)
