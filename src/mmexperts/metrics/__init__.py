"""Evaluation metrics shipped as local ``evaluate`` modules, so they load offline and need no scikit-learn.

Each metric is a folder holding ``<name>/<name>.py``; ``load_metric(name)`` calls ``evaluate.load`` on it.
"""

from __future__ import annotations

from pathlib import Path

import evaluate
import numpy as np

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES: tuple[str, ...] = ("accuracy", "multilabel_f1", "recall_at_k")


def metric_path(name: str) -> str:
    """Folder of one of our metric modules, for ``evaluate.load`` (or to copy elsewhere)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; valid choices: {', '.join(METRIC_NAMES)}.")
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(f"Metric module {folder / (name + '.py')} is missing; the package was installed "
                                "without its metric files (package data 'metrics/*/*.py').")
    return str(folder)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load one of METRIC_NAMES from its local folder; no network is used.

    Results are kept in memory (``keep_in_memory=True`` unless overridden), so parallel processes never share
    cache files. Other keyword arguments go to ``evaluate.load``.
    """
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)



def compute_metrics(logits: np.ndarray, labels: np.ndarray, multi_label: bool) -> dict[str, float]:
    """Accuracy for single-label tasks; macro and micro F1 for multi-label ones (``evaluate`` modules, offline)."""
    if multi_label:
        predictions = (logits > 0).astype(int)
        return load_metric("multilabel_f1").compute(predictions=predictions.tolist(),
                                                    references=labels.astype(int).tolist())
    return load_metric("accuracy").compute(predictions=logits.argmax(-1).tolist(), references=labels.tolist())


__all__ = ["METRICS_DIR", "METRIC_NAMES", "compute_metrics", "load_metric", "metric_path"]
