"""The local evaluate modules (accuracy, multilabel_f1, recall_at_k) against hand-computed values, offline."""

from __future__ import annotations

import os
from pathlib import Path

import evaluate
import pytest

from mmexperts.metrics import METRIC_NAMES, METRICS_DIR, load_metric, metric_path


def test_metric_folders_load_offline_with_evaluate():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert METRIC_NAMES == ("accuracy", "multilabel_f1", "recall_at_k")
    for name in METRIC_NAMES:
        assert (METRICS_DIR / name / f"{name}.py").is_file()
        module = evaluate.load(str(Path(metric_path(name))))
        assert isinstance(module, evaluate.EvaluationModule)
    with pytest.raises(ValueError, match="Unknown metric 'f1'"):
        load_metric("f1")


def test_accuracy():
    metric = load_metric("accuracy")
    assert metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2]) == {"accuracy": 0.75}
    weighted = metric.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(0.75)
    metric.add_batch(predictions=[1, 1], references=[1, 0])
    metric.add_batch(predictions=[2], references=[2])
    assert metric.compute()["accuracy"] == pytest.approx(2 / 3)


def test_multilabel_f1_hand_computed():
    predictions = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]]
    references = [[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1]]
    # per label (tp, fp, fn): (2, 0, 0) -> 1, (1, 1, 0) -> 2/3, (1, 1, 1) -> 1/2; pooled (4, 2, 1) -> 8/11
    result = load_metric("multilabel_f1").compute(predictions=predictions, references=references)
    assert result["f1_macro"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert result["f1_micro"] == pytest.approx(8 / 11)


def test_multilabel_f1_edge_cases():
    metric = load_metric("multilabel_f1")
    # label 1 never occurs and is never predicted: its F1 is zero_division
    result = metric.compute(predictions=[[1, 0], [0, 0]], references=[[1, 0], [0, 0]])
    assert result == {"f1_macro": pytest.approx(0.5), "f1_micro": pytest.approx(1.0)}
    result = metric.compute(predictions=[[1, 0], [0, 0]], references=[[1, 0], [0, 0]], zero_division=1.0)
    assert result["f1_macro"] == pytest.approx(1.0)
    perfect = metric.compute(predictions=[[1, 0, 1], [0, 1, 1]], references=[[1, 0, 1], [0, 1, 1]])
    assert perfect == {"f1_macro": 1.0, "f1_micro": 1.0}
    with pytest.raises(ValueError, match="must be 0/1"):
        metric.compute(predictions=[[2, 0]], references=[[1, 0]])
    with pytest.raises(ValueError, match="same number of labels"):
        metric.compute(predictions=[[1, 0], [1]], references=[[1, 0], [1, 0]])


def test_recall_at_k_single_and_multi_caption():
    metric = load_metric("recall_at_k")
    # text -> image: one correct image per caption
    scores = [[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.3, 0.2, 0.1]]
    result = metric.compute(predictions=scores, references=[[0], [1], [2]], k_values=[1, 2, 3])
    assert result == {"recall@1": pytest.approx(1 / 3), "recall@2": pytest.approx(2 / 3), "recall@3": 1.0}
    # image -> text: image 0 owns captions 0 and 1, image 1 owns captions 2 and 3; a hit needs any of them
    scores = [[0.1, 0.8, 0.9, 0.0],   # best correct caption (1) ranks 2nd
              [0.5, 0.4, 0.3, 0.2]]   # best correct caption (2) ranks 3rd
    result = metric.compute(predictions=scores, references=[[0, 1], [2, 3]], k_values=[1, 2, 3, 4])
    assert result == {"recall@1": 0.0, "recall@2": 0.5, "recall@3": 1.0, "recall@4": 1.0}
    # ties go to the lower gallery index
    assert metric.compute(predictions=[[0.5, 0.5]], references=[[1]], k_values=[1]) == {"recall@1": 0.0}


def test_recall_at_k_defaults_and_errors():
    metric = load_metric("recall_at_k")
    scores = [[float(j == i) for j in range(12)] for i in range(12)]
    assert metric.compute(predictions=scores, references=[[i] for i in range(12)]) == {
        "recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0}
    with pytest.raises(ValueError, match="k=10 is larger than the gallery size 4"):
        metric.compute(predictions=[[0.1, 0.2, 0.3, 0.4]], references=[[0]])
    with pytest.raises(ValueError, match="outside"):
        metric.compute(predictions=[[0.1, 0.2]], references=[[2]], k_values=[1])
    with pytest.raises(ValueError, match="no correct gallery item"):
        metric.compute(predictions=[[0.1, 0.2]], references=[[]], k_values=[1])
