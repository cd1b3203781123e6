"""Accuracy: the fraction of predicted class ids equal to the reference class ids."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy = (number of correct predictions) / (number of predictions), optionally weighted per example.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): ground-truth class ids.
    sample_weight (`list` of `float`, optional): one weight per example; uniform by default.
Returns:
    accuracy (`float`): in [0, 1].
Examples:
    >>> metric = evaluate.load("path/to/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Classification accuracy over integer class ids (numpy only, works offline)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("accuracy needs at least one prediction")
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            return {"accuracy": float(correct.mean())}
        weights = np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight has {weights.size} values for {correct.size} predictions")
        if weights.sum() <= 0:
            raise ValueError("sample_weight must sum to a positive number")
        return {"accuracy": float((correct * weights).sum() / weights.sum())}
