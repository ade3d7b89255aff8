"""One line chart for the benchmarks' --plot (matplotlib: the `bench` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def line_plot(path: Path, xs: Sequence[float], series: Sequence[tuple[str, str, Sequence[float]]], xlabel: str, ylabel: str) -> None:
    """``series``: (label, matplotlib style, ys) each; written as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, style, ys in series:
        ax.plot(xs, ys, style, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("rkllmd CPU backend, SmolLM2-135M, 2 cores")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")
