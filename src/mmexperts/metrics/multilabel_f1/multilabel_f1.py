"""Macro and micro F1 over multi-hot (0/1) multi-label predictions, computed with numpy."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
F1 for multi-label classification. Inputs are already thresholded: one 0/1 vector per example for predictions
and for references. Micro F1 pools true/false positives and false negatives over all labels; macro F1 is the
unweighted mean of the per-label F1 scores. A label with no positive reference and no positive prediction has an
undefined F1, scored as `zero_division` (0.0 by default, as in scikit-learn).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): 0/1 predictions, shape (num_examples, num_labels).
    references (`list` of `list` of `int`): 0/1 references, same shape.
    zero_division (`float`, optional): score of an undefined F1 (no positives at all); default 0.0.
Returns:
    f1_macro (`float`), f1_micro (`float`).
Examples:
    >>> metric = evaluate.load("path/to/metrics/multilabel_f1")
    >>> metric.compute(predictions=[[1, 0], [1, 1]], references=[[1, 0], [0, 1]])
    {'f1_macro': 0.8333333333333333, 'f1_micro': 0.8}
"""

_CITATION = ""


def _f1(tp, fp, fn, zero_division):
    denominator = 2 * tp + fp + fn
    safe = np.where(denominator > 0, denominator, 1)
    return np.where(denominator > 0, 2 * tp / safe, zero_division)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MultilabelF1(evaluate.Metric):
    """Macro and micro F1 for multi-label classification, from 0/1 predictions and references."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                        "references": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _compute(self, predictions, references, zero_division=0.0):
        lengths = {len(row) for row in predictions} | {len(row) for row in references}
        if len(lengths) != 1:
            raise ValueError(f"every prediction and reference must have the same number of labels; got lengths "
                             f"{sorted(lengths)}")
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("multilabel_f1 needs at least one example with at least one label")
        for name, values in (("predictions", predictions), ("references", references)):
            if not np.isin(values, (0, 1)).all():
                raise ValueError(f"{name} must be 0/1 (threshold probabilities or logits first); found values "
                                 f"{sorted(set(np.unique(values).tolist()) - {0, 1})[:5]}")
        tp = (predictions & references).sum(axis=0).astype(np.float64)
        fp = (predictions & (1 - references)).sum(axis=0).astype(np.float64)
        fn = ((1 - predictions) & references).sum(axis=0).astype(np.float64)
        per_label = _f1(tp, fp, fn, zero_division)
        micro = _f1(tp.sum(), fp.sum(), fn.sum(), zero_division)
        return {"f1_macro": float(per_label.mean()), "f1_micro": float(micro)}
