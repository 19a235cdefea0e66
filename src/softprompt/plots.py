"""Plots saved next to artifacts and reports (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

from softprompt.atomic import atomic_write_bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_loss(history: list[dict], path: str | Path, dev_key: str = "dev_loss", train_label: str = "train loss",
              dev_label: str = "dev loss", ylabel: str = "cross-entropy (nats/token)") -> None:
    """Training loss per step, with the dev metric ``dev_key`` at evaluations."""
    plt = _plt()
    train = [(h["step"], h["loss"]) for h in history if h.get("type") == "train"]
    dev = [(h["step"], h[dev_key]) for h in history if h.get("type") == "eval" and dev_key in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label=train_label, lw=1)
    if dev:
        ax.plot(*zip(*dev), "o-", label=dev_label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)
