"""PNG plots of PPO runs: RM reward, gold score, KL and beta per step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _draw(ax, runs: dict[str, list[dict]], key: str, title: str, kl_target: float | None) -> None:
    for name, hist in runs.items():
        ax.plot([h["step"] for h in hist], [h[key] for h in hist], label=name)
    if key == "kl" and kl_target:
        ax.axhline(kl_target, color="grey", ls="--", lw=1, label="KL target")
    ax.set_title(title)
    ax.set_xlabel("PPO step")
    ax.legend(fontsize=8)


def plot_ppo_histories(runs: dict[str, list[dict]], out_dir: Path, kl_target: float | None = None) -> list[Path]:
    """A 2x2 overview (ppo_overview.png) and one figure per quantity (ppo_<key>.png)."""
    panels = [("reward", "RM (proxy) reward"), ("gold", "gold score (hidden judge)"),
              ("kl", "KL(pi || rho), nats / sequence"), ("kl_coef", "beta (KL coefficient)")]
    out_dir = Path(out_dir)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        _draw(ax, runs, key, title, kl_target)
    paths = [out_dir / "ppo_overview.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    for key, title in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, runs, key, title, kl_target)
        fig.tight_layout()
        paths.append(out_dir / f"ppo_{key}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
