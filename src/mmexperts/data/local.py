"""Local data: a folder of images and rows files, read into a task.

Local data (``name="local"`` or a folder path, with ``data_dir``) is a folder of images plus ``train.jsonl``,
``validation.jsonl`` and/or ``test.jsonl`` (or ``.csv``). Each row has ``image`` (path relative to the folder, or
absolute; ``file_name`` is accepted too), ``text``, and ``label`` (a class name or class index) or ``labels`` (a list
of class names or indices; in CSV a JSON list or names joined by ``|``), or ``captions`` for retrieval (a list; in
CSV a JSON list or captions joined by ``|``) with an optional integer ``image_id``. An optional ``labels.txt`` (one
class name per line) fixes the label names and their order; otherwise they are the sorted distinct labels of the
train split, or ``"0"`` .. ``"N-1"`` when the labels are integer class indices.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from .catalog import HubDatasetSpec
from .checks import TEXT_COLUMNS, _Columns, _describe_columns, _pick, _prepare
from .rows import _read_rows_file
from .tasks import MULTI_LABEL, RETRIEVAL, SINGLE_LABEL, SPLIT_ALIASES, SPLITS, DataReport, TaskData

LOCAL_FORMATS: tuple[tuple[str, str], ...] = (("jsonl", "json"), ("json", "json"), ("csv", "csv"))


def _find_split_files(folder: Path) -> dict[str, tuple[Path, str]]:
    found: dict[str, tuple[Path, str]] = {}
    candidates = [(split, split) for split in SPLITS] + list(SPLIT_ALIASES.items())
    for stem, split in candidates:
        for extension, builder in LOCAL_FORMATS:
            path = folder / f"{stem}.{extension}"
            if path.is_file() and split not in found:
                found[split] = (path, builder)
    return found



def _load_local(name: str, folder: Path, strict: bool, max_rows: int | None,
                spec: HubDatasetSpec | None) -> TaskData:
    if not folder.is_dir():
        raise FileNotFoundError(f"data_dir {str(folder)!r} is not a folder")
    files = _find_split_files(folder)
    if not files:
        listing = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
        raise FileNotFoundError(f"no split file in {str(folder)!r}: expected train/validation/test with extension "
                                f".jsonl, .json or .csv; found {listing}")
    raw = datasets.DatasetDict()
    report = DataReport()
    for split in SPLITS:
        if split in files:
            path, builder = files[split]
            raw[split] = _read_rows_file(path, split, builder, strict, report)
    columns = raw[next(iter(raw))].column_names
    image_column = _pick(columns, ("image", "file_name"))
    if image_column is None:
        raise ValueError(f"local rows need an 'image' (or 'file_name') column with image paths; "
                         f"{_describe_columns(raw)}")
    label_names_file = folder / "labels.txt"
    label_names = None
    if label_names_file.is_file():
        label_names = [line.strip() for line in label_names_file.read_text(encoding="utf-8").splitlines()
                       if line.strip()]
    if "captions" in columns:
        task_type, text_column, label_column = RETRIEVAL, "captions", None
    else:
        text_column = _pick(columns, TEXT_COLUMNS)
        if text_column is None:
            raise ValueError(f"local rows need a 'text' column (or 'captions' for retrieval); "
                             f"{_describe_columns(raw)}")
        if "labels" in columns:
            task_type, label_column = MULTI_LABEL, "labels"
        elif "label" in columns:
            task_type, label_column = SINGLE_LABEL, "label"
        else:
            raise ValueError(f"local rows need 'label' (single-label), 'labels' (multi-label) or 'captions' "
                             f"(retrieval); {_describe_columns(raw)}")
    if spec is not None and spec.task_type != task_type:
        raise ValueError(f"{name!r} is a {spec.task_type} task but the rows in {str(folder)!r} describe a "
                         f"{task_type} task; {_describe_columns(raw)}")
    if label_names is None and spec is not None and spec.label_names:
        label_names = list(spec.label_names)
    columns_spec = _Columns(image_column, text_column, label_column,
                            "image_id" if "image_id" in columns else None)
    return _prepare(name, raw, columns_spec, task_type, label_names, strict, max_rows, base_dir=folder,
                    report=report)
