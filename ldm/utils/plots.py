"""Line plots written straight to PNG files (matplotlib, no display needed)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

Curve = tuple[str, Sequence[float], Sequence[float]]  # (label, x, y)


def plot_curves(curves: Sequence[Curve], path: str | Path, xlabel: str, ylabel: str, title: str,
                logy: bool = False) -> Path:
    """One line per (label, x, y) curve, saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, xs, ys in curves:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
