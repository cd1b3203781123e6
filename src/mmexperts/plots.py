"""Pictures users look at: routing heatmaps."""

from __future__ import annotations

import os

import numpy as np


def plot_routing(routing: np.ndarray, labels: np.ndarray | None, label_names: list[str] | None,
                 path: str | os.PathLike, title: str = "Routing") -> str:
    """Save a PNG of mean routing weights: per block x expert, and per class x expert when labels are given.

    ``routing`` is (blocks, examples, experts); single-label ``labels`` are (examples,).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routing = np.asarray(routing, dtype=float)
    panels = [("block", routing.mean(1), [f"block {i}" for i in range(routing.shape[0])])]
    if labels is not None and np.asarray(labels).ndim == 1:
        labels = np.asarray(labels)
        classes = sorted(set(labels.tolist()))
        per_class = np.stack([routing[:, labels == c].mean((0, 1)) for c in classes])
        names = [label_names[c] if label_names else str(c) for c in classes]
        panels.append(("class", per_class, names))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 0.35 * routing.shape[0] + 2.5),
                             squeeze=False)
    for ax, (name, matrix, rows) in zip(axes[0], panels):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xticks(range(matrix.shape[1]), [f"E{k}" for k in range(matrix.shape[1])])
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("expert")
        ax.set_title(f"mean weight per {name}")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
