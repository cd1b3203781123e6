"""Batch rows of a prepared task into model tensors, for a plain ``DataLoader``: images, texts and targets
(``MultimodalCollator``) or two feature sequences and a label (``FeatureCollator``)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image as PILImage

from ..errors import DataError
from .tasks import MULTI_LABEL, RETRIEVAL, SINGLE_LABEL, TASK_TYPES

# A feature task's columns and the model inputs they become; ``task_id`` is optional (multi-task S3 adapters).
FEATURE_COLUMNS = {"modality_a": "features_a", "modality_b": "features_b", "label": "labels", "task_id": "task_ids"}
REQUIRED_FEATURE_COLUMNS = ("modality_a", "modality_b", "label")


class MultimodalCollator:
    """``collate_fn`` turning rows (dicts with a PIL ``image``, a text and a target) into a batch of tensors.

    Returns ``pixel_values`` (from ``image_processor``), ``input_ids``, ``attention_mask`` (and ``token_type_ids``
    when the tokenizer makes them) padded to the longest text of the batch and truncated to ``max_length``, and
    ``labels``: class ids (long, shape (B,)) for single-label, 0/1 floats (shape (B, num_labels)) for multi-label.
    Retrieval rows give one caption per image, ``captions[caption_index]`` (the first caption by default, cycling
    when a row has fewer), or ``row[text_column]`` when a row has no ``captions``, and ``image_ids`` (long, (B,)).
    ``model_kwargs`` are constant keyword arguments added to every batch for the model (e.g.
    ``{"interpolate_pos_encoding": True}`` when the image processor resizes to another size than the vision tower's).
    It reads rows as they are stored, so no ``set_transform`` is needed.
    """

    def __init__(self, tokenizer, image_processor, task_type: str, max_length: int | None = None,
                 num_labels: int | None = None, text_column: str = "text", caption_index: int = 0,
                 model_kwargs: Mapping[str, Any] | None = None):
        if task_type not in TASK_TYPES:
            raise ValueError(f"unknown task_type {task_type!r}; valid choices: {', '.join(TASK_TYPES)}")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive or None, got {max_length!r}")
        if num_labels is not None and num_labels <= 0:
            raise ValueError(f"num_labels must be positive or None, got {num_labels!r}")
        if caption_index < 0:
            raise ValueError(f"caption_index must be >= 0, got {caption_index!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.task_type = task_type
        self.max_length = max_length
        self.num_labels = num_labels
        self.text_column = text_column
        self.caption_index = caption_index
        self.model_kwargs = dict(model_kwargs or {})

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(rows) == 0:
            raise ValueError("cannot collate an empty batch")
        images = [_rgb(self._get(row, i, "image"), i) for i, row in enumerate(rows)]
        texts = [self._text(row, i) for i, row in enumerate(rows)]
        batch: dict[str, torch.Tensor] = {
            "pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in encoded:
                batch[key] = encoded[key]
        if self.task_type == SINGLE_LABEL:
            batch["labels"] = torch.tensor([int(self._get(row, i, "label")) for i, row in enumerate(rows)],
                                           dtype=torch.long)
        elif self.task_type == MULTI_LABEL:
            batch["labels"] = self._multi_hot(rows)
        else:
            batch["image_ids"] = torch.tensor([int(self._get(row, i, "image_id")) for i, row in enumerate(rows)],
                                              dtype=torch.long)
        batch.update(self.model_kwargs)
        return batch

    def _get(self, row: Mapping[str, Any], position: int, column: str) -> Any:
        if column not in row:
            raise KeyError(f"row {position} of the batch has no {column!r} column, needed for {self.task_type}; "
                           f"it has: {', '.join(map(str, row)) or 'nothing'}")
        return row[column]

    def _text(self, row: Mapping[str, Any], position: int) -> str:
        if self.task_type == RETRIEVAL and "captions" in row:
            captions = row["captions"]
            if not captions:
                raise ValueError(f"row {position} of the batch has no captions")
            text = captions[self.caption_index % len(captions)]
        else:
            text = self._get(row, position, self.text_column)
        if not isinstance(text, str):
            raise TypeError(f"row {position} of the batch: expected a string text, got {type(text).__name__}")
        return text

    def _multi_hot(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        labels = torch.tensor([list(self._get(row, i, "labels")) for i, row in enumerate(rows)],
                              dtype=torch.float32)
        if labels.dim() != 2:
            raise ValueError("multi-label rows need 'labels' as equal-length lists of 0/1 values")
        if self.num_labels is not None and labels.shape[1] != self.num_labels:
            raise ValueError(f"rows have {labels.shape[1]} labels each, expected num_labels={self.num_labels}")
        return labels


class FeatureCollator:
    """``collate_fn`` for feature-sequence classification rows (``"synthetic:factors"``, ``"multibench:<name>"``):
    ``modality_a`` and ``modality_b`` (seq_len, dim) arrays, a class id ``label`` and, where present, ``task_id``.

    Returns ``features_a`` and ``features_b`` (float32, (B, seq_len, dim)), ``labels`` (long, (B,)) and ``task_ids``
    (long, (B,)) when the rows have them: the inputs of ``FeatureEncoderForClassification``. Rows may hold tensors
    (``with_format("torch")``), numpy arrays or nested lists.
    """

    DTYPES = {"modality_a": torch.float32, "modality_b": torch.float32, "label": torch.long, "task_id": torch.long}

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(rows) == 0:
            raise ValueError("cannot collate an empty batch")
        columns = [*REQUIRED_FEATURE_COLUMNS, *(["task_id"] if "task_id" in rows[0] else [])]
        for i, row in enumerate(rows):
            missing = [column for column in columns if column not in row]
            if missing:
                raise DataError(f"row {i} of the batch has no {', '.join(map(repr, missing))} column; a feature task's "
                                f"rows have {', '.join(REQUIRED_FEATURE_COLUMNS)} (and optionally task_id), this one "
                                f"has: {', '.join(map(str, row)) or 'nothing'}. Load it with load_task("
                                "'synthetic:factors') or 'multibench:<name>', or batch image and text rows with "
                                "MultimodalCollator.")
        batch = {}
        for column in columns:
            values = [torch.as_tensor(row[column], dtype=self.DTYPES[column]) for row in rows]
            shapes = {tuple(value.shape) for value in values}
            if len(shapes) > 1:
                raise DataError(f"the batch's {column!r} values differ in shape ({sorted(shapes)}); a feature task "
                                "has one (seq_len, dim) per modality: pad or crop its sequences to one length.")
            batch[FEATURE_COLUMNS[column]] = torch.stack(values)
        return batch


def _rgb(image: Any, position: int) -> PILImage.Image:
    """A PIL image in RGB; undecoded ``{"bytes", "path"}`` dicts and paths are opened."""
    if isinstance(image, Mapping):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image.get("path")
        if source is None:
            raise ValueError(f"row {position} of the batch has an empty image")
        image = PILImage.open(source)
    elif isinstance(image, str):
        image = PILImage.open(image)
    if not isinstance(image, PILImage.Image):
        raise TypeError(f"row {position} of the batch: expected a PIL image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


__all__ = ["FEATURE_COLUMNS", "FeatureCollator", "MultimodalCollator"]
