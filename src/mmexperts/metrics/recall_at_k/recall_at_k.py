"""Recall@K for retrieval from a query x gallery similarity matrix, with any number of correct items per query."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Recall@K: the fraction of queries for which at least one correct gallery item ranks among the K most similar.
This is the multi-caption protocol of COCO/Flickr30k retrieval: for image -> text each image query has several
correct captions and a hit needs any one of them in the top K; for text -> image each caption has one correct image.
Ties are broken in favour of the lower gallery index (stable sort).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): similarity scores, one row per query, one column per gallery item
        (higher is more similar), e.g. `(text_embeddings @ image_embeddings.T).tolist()`.
    references (`list` of `list` of `int`): for each query, the gallery indices (columns) that are correct.
    k_values (`list` of `int`, optional): the K to report; default (1, 5, 10). Each must be <= the gallery size.
Returns:
    `recall@K` (`float`) for every K in k_values.
Examples:
    >>> metric = evaluate.load("path/to/metrics/recall_at_k")
    >>> metric.compute(predictions=[[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]], references=[[0], [1]], k_values=[1, 2])
    {'recall@1': 0.5, 'recall@2': 1.0}
"""

_CITATION = ""

DEFAULT_K_VALUES = (1, 5, 10)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    """Recall@K over a similarity matrix; a query counts as a hit when any of its correct items is in the top K."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _compute(self, predictions, references, k_values=DEFAULT_K_VALUES):
        if len(predictions) == 0:
            raise ValueError("recall_at_k needs at least one query")
        gallery_sizes = {len(row) for row in predictions}
        if len(gallery_sizes) != 1:
            raise ValueError(f"every row of the similarity matrix must have the same length (the gallery size); "
                             f"got lengths {sorted(gallery_sizes)}")
        scores = np.asarray(predictions, dtype=np.float64)
        num_queries, gallery_size = scores.shape
        k_values = [int(k) for k in k_values]
        if not k_values or any(k < 1 for k in k_values):
            raise ValueError(f"k_values must be positive integers, got {k_values}")
        too_large = [k for k in k_values if k > gallery_size]
        if too_large:
            raise ValueError(f"k={max(too_large)} is larger than the gallery size {gallery_size}; recall@k is "
                             f"always 1 there. Use k_values <= {gallery_size}.")
        correct = np.zeros((num_queries, gallery_size), dtype=bool)
        for query, indices in enumerate(references):
            indices = np.asarray(indices, dtype=np.int64)
            if indices.size == 0:
                raise ValueError(f"query {query} has no correct gallery item")
            if indices.min() < 0 or indices.max() >= gallery_size:
                raise ValueError(f"query {query} has a correct index outside [0, {gallery_size}): "
                                 f"{indices.tolist()}")
            correct[query, indices] = True
        order = np.argsort(-scores, axis=1, kind="stable")
        ranked_correct = np.take_along_axis(correct, order, axis=1)
        first_hit = ranked_correct.argmax(axis=1)  # rank (0-based) of the best-ranked correct item
        return {f"recall@{k}": float((first_hit < k).mean()) for k in k_values}
