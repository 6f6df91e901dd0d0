"""Metric names: one definition each (DESIGN.md, "Metrics").

The library reports PPO step metrics as plain dicts with short keys (see
:meth:`rlhf.algos.ppo.PPOTrainer.step`); services export them to Prometheus under these names.
Base units, ``_total`` only on counters, ratios in 0..1, no ids as labels.
"""

from __future__ import annotations

# short key in a PPO step's metrics -> (Prometheus name, kind, help)
PPO_METRICS: dict[str, tuple[str, str, str]] = {
    "kl": ("rlhf_ppo_kl", "gauge", "KL(pi || rho) in nats per sequence, batch mean"),
    "kl_coef": ("rlhf_ppo_kl_coef", "gauge", "KL penalty coefficient beta used in the step"),
    "reward": ("rlhf_ppo_reward", "gauge", "mean reward-model score of the step's rollouts"),
    "policy_loss": ("rlhf_ppo_policy_loss", "gauge", "clipped surrogate policy loss"),
    "value_loss": ("rlhf_ppo_value_loss", "gauge", "clipped value loss"),
    "clipfrac_ratio": ("rlhf_ppo_clipfrac_ratio", "gauge", "share of tokens whose probability ratio was clipped"),
    "entropy": ("rlhf_ppo_entropy", "gauge", "mean per-token policy entropy in nats"),
    "response_length_tokens": ("rlhf_ppo_response_length_tokens", "gauge", "mean response length"),
    "samples_total": ("rlhf_ppo_samples_total", "counter", "rollouts trained on"),
    "tokens_total": ("rlhf_ppo_tokens_total", "counter", "response tokens trained on"),
    "step_duration_seconds": ("rlhf_ppo_step_duration_seconds", "histogram", "wall time of one PPO step"),
}


def ppo_metric_values(step: dict) -> dict[str, float]:
    """The step's values under their Prometheus names (keys missing from ``step`` are skipped)."""
    return {name: float(step[key]) for key, (name, _, _) in PPO_METRICS.items() if key in step}
