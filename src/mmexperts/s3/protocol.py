"""The S3 paper's evaluation protocol, the parts that need no training loop: what the linear probe reads
(``fused_embeds``, with the routing pairs each keep ratio keeps), and the summary and table of a keep-ratio sweep
(its plot: :func:`mmexperts.plots.plot_keep_ratio_curves`).

Training the stages and fitting the probes live in :mod:`mmexperts.training.sweep` (``three_stages``,
``keep_ratio_probe``, and the recipe's sweep over granularity x keep ratio, ``sparsity_sweep`` with
``design="paper"``).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping

import torch

from ..errors import ConfigError

FROZEN_PAIRS = (("modality_a_embeds", "modality_b_embeds"), ("vision_embeds", "text_embeds"))


@torch.no_grad()
def probe_features(model: torch.nn.Module, loader: Iterable[dict], adapter: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(features, labels, kept (token, expert) routing pairs) over ``loader``, in eval mode.

    The features are the adapter's ``fused_embeds`` (what the paper's linear probe reads) or, with ``adapter=False``,
    the frozen towers' pooled outputs side by side (no pairs then).
    """
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
            names = next((pair for pair in FROZEN_PAIRS if out.get(pair[0]) is not None), None)
            if names is None:
                raise ConfigError("adapter", f"adapter=False reads the base model's pooled tower outputs "
                                             f"({FROZEN_PAIRS}), but {type(model.base_model.model).__name__} returns "
                                             "none of them; probe the adapter's fused_embeds instead (adapter=True).")
            rows.append(torch.cat([out[name] for name in names], -1).float())
        labels.append(batch["labels"])
    return torch.cat(rows), torch.cat(labels), pairs


def summarize_keep_ratios(rows: list[dict], by: str = "model", value: str = "test_accuracy") -> list[dict]:
    """Mean and population std of ``value`` per (``by`` group, keep ratio) over seeds, groups in first-seen order:
    ``{by, "keep_ratio", "mean", "std", "kept_pairs" (mean), "seeds"}``."""
    table = []
    for group in dict.fromkeys(row[by] for row in rows):
        for ratio in sorted({row["keep_ratio"] for row in rows if row[by] == group}):
            cell = [row for row in rows if row[by] == group and row["keep_ratio"] == ratio]
            values = [row[value] for row in cell]
            kept = statistics.mean(row["kept_pairs"] for row in cell)
            table.append({by: group, "keep_ratio": ratio, "mean": statistics.mean(values),
                          "std": statistics.pstdev(values), "kept_pairs": kept, "seeds": len(values)})
    return table


def keep_ratio_table(summary: list[dict], groups: list, by: str = "model", labels: Mapping | None = None,
                     extra_rows: Iterable[tuple[str, Mapping]] = ()) -> list[str]:
    """Markdown lines: one row per keep ratio (with the mean measured fraction of pairs kept), one ``mean ± std``
    column per group (headed ``labels[group]``, default the group itself); each of ``extra_rows`` is ``(name,
    {group: (mean, std)})``, e.g. a baseline at p = 1."""
    labels = labels or {}
    cell = {(row[by], row["keep_ratio"]): row for row in summary}
    ratios = sorted({row["keep_ratio"] for row in summary if row[by] in groups})
    lines = ["| keep ratio p | pairs kept | " + " | ".join(str(labels.get(g, g)) for g in groups) + " |",
             "| ---: | ---: | " + " | ".join("---:" for _ in groups) + " |"]
    for ratio in ratios:
        present = [cell[(g, ratio)] for g in groups if (g, ratio) in cell]
        kept = statistics.mean(row["kept_pairs"] for row in present)
        values = " | ".join(f"{cell[(g, ratio)]['mean']:.4f} ± {cell[(g, ratio)]['std']:.4f}"
                            if (g, ratio) in cell else "" for g in groups)
        lines.append(f"| {ratio:g} | {kept:.3f} | {values} |")
    for name, values in extra_rows:
        shown = " | ".join(f"{values[g][0]:.4f} ± {values[g][1]:.4f}" if g in values else "" for g in groups)
        lines.append(f"| {name} | | {shown} |")
    return lines


__all__ = ["keep_ratio_table", "probe_features", "summarize_keep_ratios"]
