"""PNG plots of training runs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_log_history(log_history: list[dict], path: str | Path, keys=("loss", "eval_loss"),
                     title: str = "") -> Path | None:
    """One panel per key present in Trainer's ``log_history``: the value against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for k in keys:
        pts = [(r["step"], r[k]) for r in log_history if k in r and "step" in r]
        if pts:
            series[k] = pts
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.4), squeeze=False)
    for ax, (k, pts) in zip(axes[0], series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
