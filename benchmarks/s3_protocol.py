"""The S3 paper protocol shared by the S3 benchmarks: the three stages on a PeftModel with a paper-design S3 adapter,
the keep-ratio sweep scored by linear probes on ``fused_embeds``, and the summary, plot and table of its rows."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import peft
import torch

from mmexperts.training.probes import fit_linear_probe
from mmexperts.training.sweep import fit, only_trainable


@torch.no_grad()
def features(model: peft.PeftModel, loader, adapter: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(features, labels, number of kept (token, expert) routing pairs) over a loader, in eval mode."""
    model.eval()
    rows, labels, pairs = [], [], 0
    for batch in loader:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if adapter:
            out = model(**inputs)
            rows.append(out.fused_embeds.float())
            pairs += int((out.token_routing_weights > 0).sum())
        else:
            with model.disable_adapter():
                out = model(**inputs)
            rows.append(torch.cat([out.modality_a_embeds, out.modality_b_embeds], -1).float())
        labels.append(batch["labels"])
    return torch.cat(rows), torch.cat(labels), pairs


def probe_accuracy(model, train, test, seed: int, adapter: bool = True, num_labels: int = 2) -> tuple[float, int]:
    """Linear-probe test accuracy, and the routing pairs kept on the test split."""
    train_x, train_y, _ = features(model, train, adapter)
    test_x, test_y, pairs = features(model, test, adapter)
    logits = fit_linear_probe(train_x, train_y, test_x, multi_label=False, num_labels=num_labels, seed=seed)
    return float((logits.argmax(-1) == test_y).float().mean()), pairs


def keep_ratio_sweep(model, train, test, seed: int, name: str, ratios: list[float], num_labels: int = 2) -> list[dict]:
    """Probe accuracy at every keep ratio; ``kept_pairs`` is measured, as a fraction of the unpruned pairs."""
    model.base_model.set_keep_ratio(1.0)
    every = features(model, test)[2]
    rows = []
    for ratio in ratios:
        model.base_model.set_keep_ratio(ratio)
        accuracy, pairs = probe_accuracy(model, train, test, seed, num_labels=num_labels)
        rows.append({"seed": seed, "model": name, "keep_ratio": ratio, "kept_pairs": round(pairs / every, 4),
                     "test_accuracy": accuracy})
    model.base_model.set_keep_ratio(1.0)
    return rows


def three_stages(model: peft.PeftModel, train, train_eval, test, seed: int, prefix: str, ratios: list[float],
                 stage1_epochs: int, stage2_epochs: int, learning_rate: float, weight_decay: float = 1e-2,
                 num_labels: int = 2) -> list[dict]:
    """Stage 1 (Specialization, no labels), its keep-ratio sweep, stage 2 (Selection: the routers only, with labels),
    and the keep-ratio sweep of the three-stage model; rows named ``"{prefix}: specialization only"`` and
    ``"{prefix}: S3 (three stages)"``."""
    fit(model, train, stage1_epochs, learning_rate, weight_decay, labels=False)
    rows = keep_ratio_sweep(model, train_eval, test, seed, f"{prefix}: specialization only", ratios, num_labels)
    model.base_model.set_stage("selection")
    with only_trainable(model, model.base_model.selection_parameters()):
        fit(model, train, stage2_epochs, learning_rate, weight_decay)
    rows += keep_ratio_sweep(model, train_eval, test, seed, f"{prefix}: S3 (three stages)", ratios, num_labels)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and population std of test accuracy per (model, keep ratio) over seeds."""
    table = []
    for model in dict.fromkeys(row["model"] for row in rows):
        for ratio in sorted({row["keep_ratio"] for row in rows if row["model"] == model}):
            cell = [row for row in rows if row["model"] == model and row["keep_ratio"] == ratio]
            values = [row["test_accuracy"] for row in cell]
            kept = statistics.mean(row["kept_pairs"] for row in cell)
            table.append({"model": model, "keep_ratio": ratio, "mean": statistics.mean(values),
                          "std": statistics.pstdev(values), "kept_pairs": kept, "seeds": len(values)})
    return table


def plot(summary: list[dict], path: Path, title: str, chance: float | None = None) -> None:
    """Accuracy against keep ratio (mean +- std bands); models with one cell are drawn as horizontal baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    styles = iter(["--", "-.", ":", (0, (5, 1))])
    for model in dict.fromkeys(row["model"] for row in summary):
        cells = [row for row in summary if row["model"] == model]
        x = np.array([row["keep_ratio"] for row in cells])
        mean, std = np.array([row["mean"] for row in cells]), np.array([row["std"] for row in cells])
        if len(cells) == 1:
            ax.axhline(mean[0], color="grey", linestyle=next(styles, "--"), label=f"{model} (no adapter)")
            continue
        ax.plot(x, mean, marker="o", label=model)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    if chance is not None:
        ax.axhline(chance, color="black", linewidth=0.8, label="chance")
    ax.set_xlabel("keep ratio p (fraction of top-k routing pairs kept per batch)")
    ax.set_ylabel("linear-probe test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_table(summary: list[dict], models: list[str]) -> list[str]:
    """Markdown rows: one per keep ratio, a column of mean +- std per model."""
    ratios = sorted({row["keep_ratio"] for row in summary if row["model"] in models})
    cell = {(row["model"], row["keep_ratio"]): row for row in summary}
    lines = ["| keep ratio p | pairs kept | " + " | ".join(models) + " |",
             "| --- | --- | " + " | ".join("---" for _ in models) + " |"]
    for ratio in ratios:
        kept = cell[(models[-1], ratio)]["kept_pairs"]
        values = " | ".join(f"{cell[(m, ratio)]['mean']:.4f} ± {cell[(m, ratio)]['std']:.4f}" for m in models)
        lines.append(f"| {ratio:.1f} | {kept:.3f} | {values} |")
    return lines
