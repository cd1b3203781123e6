"""Pictures users look at: routing heatmaps, expert usage per class or per direction, retrieval recall, the S3
sparsity and keep-ratio curves. Every function takes plain arrays, writes one PNG atomically and returns its path."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .atomic import write_file_atomic

WEIGHT_LABEL = "mean routing weight"


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (figures are only ever written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> str:
    """Render ``fig`` to PNG bytes and write them atomically (readers never see half a PNG)."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_file_atomic(path, buffer.getvalue())
    return str(path)


def _heatmap(fig, ax, matrix: np.ndarray, rows: Sequence[str], title: str) -> None:
    """A row x expert heatmap of mean routing weights, white at uniform routing (1/K), red above, blue below, with a
    labelled colour bar that marks 1/K."""
    from matplotlib.colors import TwoSlopeNorm

    experts = matrix.shape[1]
    uniform = 1 / experts
    norm = TwoSlopeNorm(vcenter=uniform, vmin=0, vmax=max(float(matrix.max()), 2 * uniform))
    image = ax.imshow(matrix, aspect="auto", cmap="RdBu_r", norm=norm)
    ax.set_xticks(range(experts), [f"E{k}" for k in range(experts)])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("expert")
    ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, fraction=0.046)
    bar.ax.axhline(uniform, color="black", linewidth=1, linestyle="--")
    bar.set_label(f"{WEIGHT_LABEL}\n(dashed, white: uniform 1/K = {uniform:.3g})")


def _per_class(weights: np.ndarray, labels: np.ndarray, label_names: Sequence[str] | None) -> tuple[np.ndarray, list]:
    """Mean of ``weights`` (examples, K) per class: single-label ``labels`` (examples,) or multi-hot (examples, C)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        classes = [c for c in range(labels.shape[1]) if (labels[:, c] > 0).any()]
        members = [labels[:, c] > 0 for c in classes]
    else:
        classes = sorted(set(labels.astype(int).tolist()))
        members = [labels == c for c in classes]
    matrix = np.stack([weights[m].mean(0) for m in members])
    names = [str(label_names[c]) if label_names else str(c) for c in classes]
    return matrix, names


def plot_routing(routing: np.ndarray, labels: np.ndarray | None, label_names: Sequence[str] | None,
                 path: str | os.PathLike, title: str = "Routing", tower: str | None = None,
                 split: str | None = None) -> str:
    """PNG of mean routing weights per block x expert, and per class x expert when labels are given.

    ``routing`` is (blocks, examples, experts); ``labels`` (examples,) single-label or (examples, classes) multi-hot.
    ``tower`` and ``split`` name where the routing happened and which data it was measured on (axes and title).
    """
    plt = pyplot()
    routing = np.asarray(routing, dtype=float)
    where = f"{tower} tower " if tower else ""
    panels = [(routing.mean(1), [f"{where}block {i}" for i in range(routing.shape[0])], "per block")]
    if labels is not None:
        matrix, names = _per_class(routing.mean(0), labels, label_names)
        panels.append((matrix, names, "per class (all blocks)"))
    height = 0.35 * max(len(rows) for _, rows, _ in panels) + 2.8
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), height), squeeze=False,
                             layout="constrained")
    for ax, (matrix, rows, what) in zip(axes[0], panels):
        _heatmap(fig, ax, matrix, rows, f"{WEIGHT_LABEL} {what}")
    context = ", ".join(part for part in (f"{tower} tower" if tower else "", f"{split} split" if split else "") if part)
    fig.suptitle(f"{title} ({context})" if context else title)
    return save_figure(fig, path)


def plot_class_usage(weights: np.ndarray, labels: np.ndarray, label_names: Sequence[str] | None,
                     path: str | os.PathLike, title: str = "Expert usage per class") -> str:
    """PNG of class x expert mean routing weight from ``weights`` (examples, experts) and ``labels`` (examples,) or
    multi-hot (examples, classes)."""
    plt = pyplot()
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 2:
        raise ValueError(f"weights must be (examples, experts), got shape {weights.shape}")
    matrix, names = _per_class(weights, labels, label_names)
    fig, ax = plt.subplots(figsize=(0.5 * weights.shape[1] + 4.5, 0.35 * len(names) + 2.4), layout="constrained")
    _heatmap(fig, ax, matrix, names, title)
    ax.set_ylabel("class")
    return save_figure(fig, path)


def plot_direction_usage(weights: np.ndarray, sites: Sequence[str], path: str | os.PathLike,
                         title: str = "Expert usage per direction") -> str:
    """PNG of direction x expert mean routing weight; ``weights`` is (sites, examples, experts), one name per site
    (e.g. 'image→text contrastive')."""
    plt = pyplot()
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 3 or len(sites) != weights.shape[0]:
        raise ValueError(f"weights must be (sites, examples, experts) with one name per site, got shape "
                         f"{weights.shape} and {len(sites)} names")
    fig, ax = plt.subplots(figsize=(0.5 * weights.shape[2] + 5.5, 0.35 * len(sites) + 2.4), layout="constrained")
    _heatmap(fig, ax, weights.mean(1), list(sites), title)
    ax.set_ylabel("direction")
    return save_figure(fig, path)


def plot_recall(metrics: dict, path: str | os.PathLike, title: str = "Retrieval recall",
                k_values: Sequence[int] = (1, 5, 10)) -> str:
    """Bar chart of Recall@K (percent) per direction from ``i2t_r{k}`` / ``t2i_r{k}`` metrics (``eval_`` prefix
    allowed); the bars carry their values."""
    plt = pyplot()
    directions = {"i2t": "image → text", "t2i": "text → image"}

    def value(direction: str, k: int) -> float:
        key = f"{direction}_r{k}"
        return float(metrics[key] if key in metrics else metrics[f"eval_{key}"])

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    width = 0.8 / len(directions)
    for i, (short, name) in enumerate(directions.items()):
        values = [value(short, k) for k in k_values]
        bars = ax.bar(np.arange(len(k_values)) + (i - (len(directions) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(k_values)), [f"R@{k}" for k in k_values])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left")
    rsum = metrics.get("rsum", metrics.get("eval_rsum"))
    ax.set_title(f"{title} (RSUM {float(rsum):.1f})" if rsum is not None else title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sparsity_curve(summary: list[dict], path: str | os.PathLike, title: str) -> str:
    """PNG of mean test accuracy (with a std band over seeds) against sparsity; ``summary`` rows hold ``sparsity``,
    ``mean`` and ``std``."""
    plt = pyplot()
    x = np.array([row["sparsity"] for row in summary])
    mean, std = np.array([row["mean"] for row in summary]), np.array([row["std"] for row in summary])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, mean, marker="o")
    ax.fill_between(x, mean - std, mean + std, alpha=0.25)
    ax.set_xlabel("sparsity (fraction of experts pruned)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["plot_class_usage", "plot_direction_usage", "plot_recall", "plot_routing", "plot_sparsity_curve"]


def plot_keep_ratio_curves(summary: list[dict], path: str | os.PathLike, title: str, by: str = "model",
                           labels: Mapping | None = None, reference: Mapping | None = None,
                           reference_label: str = "", chance: float | None = None) -> str:
    """PNG of accuracy against keep ratio, one line per group with a mean ± std band; a group with a single cell is a
    horizontal baseline. ``reference`` maps a group to ``(mean, std)`` drawn as an open marker at p = 1 (shifted right a
    little per group, so they do not overlap) in the group's colour (e.g. the model after stage 1 alone), labelled
    ``"{label}: {reference_label}"``."""
    plt = pyplot()
    labels, reference = labels or {}, reference or {}
    fig, ax = plt.subplots(figsize=(8.5, 4))
    styles = iter(["--", "-.", ":", (0, (5, 1))])
    for index, group in enumerate(dict.fromkeys(row[by] for row in summary)):
        cells = [row for row in summary if row[by] == group]
        name = str(labels.get(group, group))
        x = np.array([row["keep_ratio"] for row in cells])
        mean, std = np.array([row["mean"] for row in cells]), np.array([row["std"] for row in cells])
        if len(cells) == 1:
            ax.axhline(mean[0], color="grey", linestyle=next(styles, "--"), label=name)
            continue
        line, = ax.plot(x, mean, marker="o", markersize=4, label=name)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        if group in reference:
            ref_mean, ref_std = reference[group]
            ax.errorbar([1.0 + 0.012 * (index + 1)], [ref_mean], yerr=[ref_std], fmt="s", markersize=7,
                        markerfacecolor="none", color=line.get_color(), capsize=3, label=f"{name}: {reference_label}")
    if chance is not None:
        ax.axhline(chance, color="black", linewidth=0.8, label="chance")
    ax.set_xlabel("keep ratio p (fraction of top-k routing pairs kept per batch)")
    ax.set_ylabel("linear-probe test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, off the curves
    fig.tight_layout()
    return save_figure(fig, path)
