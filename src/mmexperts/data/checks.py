"""Column inference and bad-row checks: which raw columns hold the image, text, label and image id, and the row
checks that turn raw splits into the standard columns (see ``data.tasks``).

Rows with a missing or undecodable image, an empty text (or caption) or a label outside the label names are
counted in a ``DataReport`` and dropped, or, with ``strict=True``, stop loading with an error naming the row. In
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image as PILImage

from ..errors import DataError
from .tasks import MULTI_LABEL, RETRIEVAL, SINGLE_LABEL, DataReport, TaskData

TEXT_COLUMNS: tuple[str, ...] = ("text", "caption", "sentence", "hypothesis", "sentence2")
CAPTION_COLUMNS: tuple[str, ...] = ("captions", "caption", "sentences", "answer")
LABEL_COLUMNS: tuple[str, ...] = ("label", "labels")
IMAGE_ID_COLUMNS: tuple[str, ...] = ("image_id", "img_id", "id")
LIST_SEPARATOR = "|"
_REASON = "__bad_row_reason"
_ENCODED = "__encoded_target"
_IMAGE = "__image_path"
_CAPTIONS = "__captions"
_DRAFT_SIZE = (64, 64)


@dataclass(frozen=True)
class _Columns:
    image: str
    text: str | None
    label: str | None
    image_id: str | None


def _prepare(name: str, raw: datasets.DatasetDict, columns: _Columns, task_type: str,
             label_names: list[str] | None, strict: bool, max_rows: int | None, base_dir: Path | None,
             report: DataReport | None = None) -> TaskData:
    """Check and convert every split to the standard columns, dropping (or, strictly, refusing) bad rows;
    ``report`` may already hold the malformed lines of the files."""
    if max_rows is not None and "train" in raw and len(raw["train"]) > max_rows:
        raw["train"] = raw["train"].select(range(max_rows))
    if task_type != RETRIEVAL and label_names is None:
        label_names = _infer_label_names(raw, columns.label, task_type)
    label_names = list(label_names or [])
    if task_type != RETRIEVAL and not label_names:
        raise ValueError(f"{name!r}: no label names found (empty train labels and no labels.txt)")
    report = report if report is not None else DataReport()
    out = datasets.DatasetDict()
    offset = 0
    for split, ds in raw.items():
        if isinstance(ds.features[columns.image], datasets.Image):
            ds = ds.cast_column(columns.image, datasets.Image(decode=False))
        inputs = [c for c in (columns.image, columns.text, columns.label, columns.image_id) if c]
        missing = [c for c in inputs if c not in ds.column_names]
        if missing:
            raise ValueError(f"{name!r}: split {split!r} lacks column(s) {', '.join(missing)}; "
                             f"available columns: {', '.join(ds.column_names)}")
        check = _row_checker(task_type, label_names, base_dir, columns, split, strict, offset)
        # Only the small computed columns are written (in memory, never from a stale cache: image files can change
        # without the row files changing); they are then joined to the original columns.
        checked = ds.map(check, batched=True, with_indices=True, input_columns=inputs, remove_columns=ds.column_names,
                         features=_checked_features(task_type, label_names, local=base_dir is not None),
                         keep_in_memory=True, load_from_cache_file=False, desc=f"checking {name} {split}")
        report.add(split, checked[_REASON])
        keep = [c for c in (columns.image, columns.text) if c]
        ds = datasets.concatenate_datasets([ds.select_columns(keep), checked], axis=1)
        ds = ds.filter(lambda reasons: [not r for r in reasons], input_columns=_REASON, batched=True,
                       keep_in_memory=True, load_from_cache_file=False, desc=f"dropping bad rows of {split}")
        out[split] = _standard_columns(ds, columns, task_type)
        offset += len(raw[split])
    return TaskData(out, task_type, label_names, name, report)


def _row_checker(task_type: str, label_names: list[str], base_dir: Path | None, columns: _Columns, split: str,
                 strict: bool, offset: int) -> Callable:
    """Batched ``map`` function giving per row the bad-row reason ('' if good), the target and, for local data,
    the resolved image path; for retrieval also the captions as a list."""
    index = {label: i for i, label in enumerate(label_names)}
    for i, label in enumerate(label_names):
        index.setdefault(label.lower(), i)  # 'Entailment' matches 'entailment' unless both are classes
    roles = [role for role in ("image", "text", "label", "image_id") if getattr(columns, role) is not None]

    def check(*args):
        values = dict(zip(roles, args[:-1]))
        indices = args[-1]
        out: dict[str, list] = {_REASON: [], _ENCODED: []}
        if base_dir is not None:
            out[_IMAGE] = []
        if task_type == RETRIEVAL:
            out[_CAPTIONS] = []
        for row, i in enumerate(indices):
            image, reason = _check_image(values["image"][row], base_dir)
            text = values["text"][row]
            if not reason:
                reason = _check_text(text, task_type)
            target = None
            if task_type == RETRIEVAL:
                ids = values.get("image_id")
                target = int(ids[row]) if ids is not None and ids[row] is not None else offset + i
            elif not reason:
                target = _encode_label(values["label"][row], task_type, label_names, index)
                if target is None:
                    reason = "unknown_label"
            if reason and strict:
                raise DataError(_bad_row_message(split, i, reason, image, text,
                                                  values["label"][row] if "label" in values else None, label_names))
            out[_REASON].append(reason)
            out[_ENCODED].append(target)
            if base_dir is not None:
                out[_IMAGE].append(image if isinstance(image, str) else None)
            if task_type == RETRIEVAL:
                out[_CAPTIONS].append(None if reason else _as_list(text))
        return out

    return check


def _bad_row_message(split: str, row: int, reason: str, image: Any, text: Any, label: Any,
                     label_names: list[str]) -> str:
    if reason in ("missing_image", "corrupt_image"):
        shown = image.get("path") or "<image bytes>" if isinstance(image, dict) else image
        detail = f"image {shown!r}"
    elif reason == "empty_text":
        detail = f"text {text!r}"
    else:
        detail = f"label {label!r} is not one of {label_names}"
    return (f"Bad row in split {split!r}, row {row} (0-based): {reason.replace('_', ' ')}: {detail}. Fix the row, "
            "or load without strict=True to drop bad rows.")


def _check_image(value: Any, base_dir: Path | None) -> tuple[Any, str]:
    """The image as a resolved path or a bytes dict, and '' / 'missing_image' / 'corrupt_image'."""
    data, path = None, None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, str):
        path = value
    if data is None:
        if not path or not str(path).strip():
            return value, "missing_image"
        path = str(path)
        if base_dir is not None and not os.path.isabs(path):
            path = str(base_dir / path)
        if not os.path.isfile(path):
            return path, "missing_image"
        value = path
    try:
        with PILImage.open(io.BytesIO(data) if data is not None else path) as image:
            image.draft("RGB", _DRAFT_SIZE)  # JPEG: decode at reduced scale, enough to detect corrupt files
            image.load()
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return value, "corrupt_image"
    return value, ""


def _check_text(value: Any, task_type: str) -> str:
    if task_type == RETRIEVAL:
        captions = _as_list(value)
        if not captions or any(not isinstance(c, str) or not c.strip() for c in captions):
            return "empty_text"
        return ""
    return "" if isinstance(value, str) and value.strip() else "empty_text"


def _encode_label(value: Any, task_type: str, label_names: list[str], index: dict[str, int]):
    """Class index (single-label) or multi-hot list (multi-label); None when the label is not a known class."""
    num_labels = len(label_names)

    def class_index(item: Any) -> int | None:
        if isinstance(item, bool) or item is None:
            return None
        if isinstance(item, int):
            return item if 0 <= item < num_labels else None
        if isinstance(item, float) and item.is_integer():
            return class_index(int(item))
        if isinstance(item, str):
            item = item.strip()
            return index[item] if item in index else index.get(item.lower())
        return None

    if task_type == SINGLE_LABEL:
        return class_index(value)
    items = _as_list(value)
    if items is None:
        return None
    if items and all(isinstance(x, float) for x in items) and len(items) == num_labels:
        return [float(x) for x in items] if all(x in (0.0, 1.0) for x in items) else None
    target = [0.0] * num_labels
    for item in items:
        position = class_index(item)
        if position is None:
            return None
        target[position] = 1.0
    return target


def _as_list(value: Any) -> list | None:
    """A list value as is; a string holding a JSON list or items joined by '|' (CSV cells) as a list."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                return None
            return parsed if isinstance(parsed, list) else None
        return [part.strip() for part in text.split(LIST_SEPARATOR)] if text else []
    return None


def _infer_label_names(raw: datasets.DatasetDict, label_column: str, task_type: str) -> list[str]:
    """Sorted distinct labels of the train split (or of the first split); integer labels are class indices."""
    split = "train" if "train" in raw else next(iter(raw))
    values = raw[split][label_column]
    items: list = []
    for value in values:
        if task_type == MULTI_LABEL:
            parsed = _as_list(value)
            if parsed and all(isinstance(x, float) for x in parsed):  # already multi-hot
                return [str(i) for i in range(len(parsed))]
            items.extend(parsed or [])
        else:
            items.append(value)
    integers = [x for x in items if isinstance(x, int) and not isinstance(x, bool) and x >= 0]
    if integers and len(integers) == len([x for x in items if x is not None]):
        return [str(i) for i in range(max(integers) + 1)]
    return sorted({x.strip() for x in items if isinstance(x, str) and x.strip()})


def _target_feature(task_type: str, label_names: list[str]) -> Any:
    if task_type == SINGLE_LABEL:
        return datasets.ClassLabel(names=label_names)
    if task_type == MULTI_LABEL:
        return datasets.List(datasets.Value("float32"), length=len(label_names))
    return datasets.Value("int64")


def _checked_features(task_type: str, label_names: list[str], local: bool) -> datasets.Features:
    """Features of the columns the row checker writes, already in their final types."""
    features = {_REASON: datasets.Value("string"), _ENCODED: _target_feature(task_type, label_names)}
    if local:
        features[_IMAGE] = datasets.Value("string")
    if task_type == RETRIEVAL:
        features[_CAPTIONS] = datasets.List(datasets.Value("string"))
    return datasets.Features(features)


def _standard_columns(ds: datasets.Dataset, columns: _Columns, task_type: str) -> datasets.Dataset:
    """Rename the checked columns to the standard ones; only the image feature changes type (no data copy)."""
    image = _IMAGE if _IMAGE in ds.column_names else columns.image
    if task_type == RETRIEVAL:
        mapping = {image: "image", _CAPTIONS: "captions", _ENCODED: "image_id"}
    else:
        mapping = {image: "image", columns.text: "text", _ENCODED: "label" if task_type == SINGLE_LABEL else "labels"}
    ds = ds.select_columns(list(mapping)).rename_columns({k: v for k, v in mapping.items() if k != v})
    return ds.cast_column("image", datasets.Image(mode="RGB"))


# -------------------------------------------------------------------------------------------------------- helpers


def _pick(columns: list[str], candidates: Iterable[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _list_inner(feature: Any) -> Any:
    """The item feature of a list-like feature, or None when the feature is not a list."""
    if isinstance(feature, list) and feature:
        return feature[0]
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return feature.feature
    return None


def _is_string(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _is_string_list(feature: Any) -> bool:
    inner = _list_inner(feature)
    return inner is not None and _is_string(inner)


def _is_integer(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))


def _describe_columns(raw: datasets.DatasetDict) -> str:
    first = raw[next(iter(raw))]
    described = ", ".join(f"{c} ({_feature_name(first.features[c])})" for c in first.column_names)
    return f"available columns: {described or 'none'}"


def _feature_name(feature: Any) -> str:
    if isinstance(feature, datasets.Value):
        return feature.dtype
    inner = _list_inner(feature)
    if inner is not None:
        return f"list of {_feature_name(inner)}"
    return type(feature).__name__
