"""The PNGs a run leaves behind: its loss curve and its expert-load heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def plot_loss_curve(records: list[dict[str, Any]], out: Path) -> Path:
    train = [(r["step"], r["lm_loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train LM loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_expert_load(share_LE: np.ndarray, out: Path, title: str) -> Path:
    """Heatmap of the share of routed assignments per (MoE layer, expert)."""
    n_layers, n_experts = share_LE.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * n_experts + 2), max(3, 0.5 * n_layers + 1.5)))
    image = ax.imshow(share_LE, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_layers))
    if n_experts <= 32:
        ax.set_xticks(range(n_experts))
    ax.set_title(title + f" (uniform = {1 / n_experts:.3f})", fontsize=10)
    fig.colorbar(image, ax=ax, label="share of assignments")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
