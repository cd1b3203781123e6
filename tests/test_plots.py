"""Every plot of the package writes a PNG for tiny inputs (issue 14: plots that say what they show)."""

from __future__ import annotations

import numpy as np
import pytest

from mmexperts.plots import plot_class_usage, plot_direction_usage, plot_recall, plot_routing, plot_sparsity_curve

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    data = open(path, "rb").read()
    return data[:8] == PNG and len(data) > 1000


def weights(*shape: int, seed: int = 0) -> np.ndarray:
    raw = np.random.default_rng(seed).random(shape)
    return raw / raw.sum(-1, keepdims=True)


@pytest.mark.parametrize("labels", [None, np.array([0, 1, 2, 1, 0]), np.eye(3)[[0, 1, 2, 1, 0]]],
                         ids=["no labels", "single-label", "multi-hot"])
def test_routing_heatmap(tmp_path, labels):
    path = plot_routing(weights(2, 5, 4), labels, ["cat", "dog", "owl"], tmp_path / "routing.png",
                        title="mope routing on synthetic:entailment", tower="text", split="validation")
    assert is_png(path)


def test_class_usage_takes_a_batch_by_experts_array(tmp_path):
    assert is_png(plot_class_usage(weights(6, 4), np.array([0, 1, 0, 1, 1, 0]), ["no", "yes"], tmp_path / "u.png"))
    with pytest.raises(ValueError, match="examples, experts"):
        plot_class_usage(weights(1, 6, 4), np.zeros(6), None, tmp_path / "bad.png")


def test_direction_usage_and_recall(tmp_path):
    sites = ["image→text contrastive", "image→text regression", "text→image contrastive", "text→image regression"]
    assert is_png(plot_direction_usage(weights(4, 5, 3), sites, tmp_path / "usage.png"))
    metrics = {f"eval_{d}_r{k}": 10.0 * k for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"eval_rsum": 320.0}
    assert is_png(plot_recall(metrics, tmp_path / "recall.png"))


def test_sparsity_curve(tmp_path):
    summary = [{"sparsity": s, "mean": 0.8 - s / 4, "std": 0.02} for s in (0.0, 0.25, 0.5)]
    assert is_png(plot_sparsity_curve(summary, tmp_path / "curve.png", "S3 on factors"))
