"""Load a multimodal task (synthetic, local folder or Hugging Face Hub) into standard columns, dropping bad rows.

Every task comes back as a ``TaskData`` whose ``DatasetDict`` has the same columns whatever the source:

* single-label classification: ``image`` (``datasets.Image``, RGB), ``text`` (str), ``label`` (``ClassLabel``);
* multi-label classification: ``image``, ``text``, ``labels`` (list of 0.0/1.0 floats, one per label name);
* retrieval: ``image``, ``captions`` (list of str), ``image_id`` (int);
* feature-sequence classification (``"synthetic:factors"``, ``"multibench:<name>"``): ``modality_a`` and
  ``modality_b`` (float32 ``Array2D`` [seq_len, dim]) and ``label`` (``ClassLabel``), splits train/validation/test.

Local data (``name="local"`` or a folder path, with ``data_dir``) is a folder of images plus ``train.jsonl``,
``validation.jsonl`` and/or ``test.jsonl`` (or ``.csv``). Each row has ``image`` (path relative to the folder, or
absolute; ``file_name`` is accepted too), ``text``, and ``label`` (a class name or class index) or ``labels`` (a list
of class names or indices; in CSV a JSON list or names joined by ``|``), or ``captions`` for retrieval (a list; in
CSV a JSON list or captions joined by ``|``) with an optional integer ``image_id``. An optional ``labels.txt`` (one
class name per line) fixes the label names and their order; otherwise they are the sorted distinct labels of the
train split, or ``"0"`` .. ``"N-1"`` when the labels are integer class indices.

Rows with a missing or undecodable image, an empty text (or caption) or a label outside the label names are
counted in a ``DataReport`` and dropped, or, with ``strict=True``, stop loading with an error naming the row. In
local files, a line that is not UTF-8, not valid JSON or not a JSON object (a CSV record that is not UTF-8) is a
``malformed_line`` bad row: dropped and listed with its file and line in ``DataReport.bad_lines``, or, with
``strict=True``, a ``DataError`` naming the file and line. An empty or unreadable file is a ``DataError``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image as PILImage

from ..errors import DataError
from ..offline.factors import build_factor_dataset
from ..offline.synthetic import MULTILABEL_NAMES, build_synthetic_splits
from ..offline.synthetic import TASKS as SYNTHETIC_TASKS
from .fashion import TASKS as FASHION_TASKS
from .fashion import build_fashion_splits
from .multibench import load_multibench

TASK_TYPES = ("single_label_classification", "multi_label_classification", "retrieval")
SINGLE_LABEL, MULTI_LABEL, RETRIEVAL = TASK_TYPES
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_ALIASES: dict[str, str] = {"val": "validation", "valid": "validation", "dev": "validation"}
LOCAL_FORMATS: tuple[tuple[str, str], ...] = (("jsonl", "json"), ("json", "json"), ("csv", "csv"))
TEXT_COLUMNS: tuple[str, ...] = ("text", "caption", "sentence", "hypothesis", "sentence2")
CAPTION_COLUMNS: tuple[str, ...] = ("captions", "caption", "sentences", "answer")
LABEL_COLUMNS: tuple[str, ...] = ("label", "labels")
IMAGE_ID_COLUMNS: tuple[str, ...] = ("image_id", "img_id", "id")
BAD_ROW_REASONS: tuple[str, ...] = ("missing_image", "corrupt_image", "empty_text", "unknown_label")
MALFORMED_LINE = "malformed_line"  # counted only when it occurs (local files)
_SHOWN_BAD_LINES = 5
LIST_SEPARATOR = "|"
_REASON = "__bad_row_reason"
_ENCODED = "__encoded_target"
_IMAGE = "__image_path"
_CAPTIONS = "__captions"
_DRAFT_SIZE = (64, 64)
_CSV_STRING_COLUMNS: tuple[str, ...] = ("image", "file_name", "captions", "labels") + TEXT_COLUMNS

_SYNTHETIC_TASK_TYPES = {"entailment": SINGLE_LABEL, "multilabel": MULTI_LABEL, "retrieval": RETRIEVAL}
FACTOR_TASK = "synthetic:factors"
FASHION_PREFIX = "fashion:"
MULTIBENCH_PREFIX = "multibench:"


@dataclass(frozen=True)
class HubDatasetSpec:
    """Where a known benchmark lives on the Hub and which of its columns hold the image, text and label."""

    hub_id: str | None
    task_type: str
    image_column: str = "image"
    text_column: str | None = None
    label_column: str | None = None
    label_names: tuple[str, ...] | None = None
    id_column: str | None = None
    description: str = ""


KNOWN_DATASETS: dict[str, HubDatasetSpec] = {
    "snli-ve": HubDatasetSpec(
        "Dec2Enc/e-snli-ve", SINGLE_LABEL, "image", "hypothesis", "label",
        ("entailment", "neutral", "contradiction"),
        description="e-SNLI-VE (corrected SNLI-VE): Flickr30k image, hypothesis, entailment/neutral/contradiction."),
    "mm-imdb": HubDatasetSpec(
        None, MULTI_LABEL,
        description="MM-IMDb (Arevalo et al., 2017): movie poster + plot, multi-label genres. It has no maintained "
                    "copy on the Hub with images: export it to data_dir with rows {image, text, labels: [genres]} "
                    "and a labels.txt of the 23 genres."),
    "food101": HubDatasetSpec(
        None, SINGLE_LABEL,
        description="UPMC Food-101 (Wang et al., 2015): food photo + recipe web page text, 101 classes. It has no "
                    "maintained copy on the Hub with texts (ethz/food101 holds images only): export it to data_dir "
                    "with rows {image, text, label: class name}."),
    "coco": HubDatasetSpec(
        "lmms-lab/COCO-Caption2017", RETRIEVAL, "image", "answer", id_column="id",
        description="COCO 2017 captions (5 per image) for caption <-> image retrieval."),
    "flickr30k": HubDatasetSpec(
        "lmms-lab/flickr30k", RETRIEVAL, "image", "caption", id_column="img_id",
        description="Flickr30k (5 captions per image, one 'test' split of 31,783 images) for retrieval."),
}


@dataclass(frozen=True)
class BadLine:
    """A line of a local rows file that could not be read as a row."""

    split: str
    path: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}, line {self.line}: {self.problem}"


@dataclass
class DataReport:
    """Bad rows found while preparing a task: ``counts[split][reason]`` and ``total[reason]`` over all splits;
    ``bad_lines`` lists the malformed lines of local files (file, line and problem)."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_ROW_REASONS, 0))
    bad_lines: list[BadLine] = field(default_factory=list)

    def add_line(self, bad: BadLine) -> None:
        """Count and record one malformed line."""
        self.add(bad.split, (MALFORMED_LINE,))
        self.bad_lines.append(bad)

    def add(self, split: str, reasons: Iterable[str]) -> None:
        """Count the non-empty reasons of one split (one reason per bad row)."""
        split_counts = self.counts.setdefault(split, dict.fromkeys(BAD_ROW_REASONS, 0))
        for reason in reasons:
            if reason:
                split_counts[reason] = split_counts.get(reason, 0) + 1
                self.total[reason] = self.total.get(reason, 0) + 1

    @property
    def num_dropped(self) -> int:
        return sum(self.total.values())

    def __str__(self) -> str:
        if not self.num_dropped:
            return "no bad rows"

        def describe(counts: dict[str, int]) -> str:
            return ", ".join(f"{reason}={n}" for reason, n in counts.items() if n)

        parts = [f"{split}: {sum(c.values())} ({describe(c)})" for split, c in self.counts.items() if sum(c.values())]
        text = f"{self.num_dropped} bad rows dropped - " + "; ".join(parts)
        if self.bad_lines:
            shown = "; ".join(str(bad) for bad in self.bad_lines[:_SHOWN_BAD_LINES])
            more = len(self.bad_lines) - _SHOWN_BAD_LINES
            text += f". Malformed lines: {shown}" + (f"; and {more} more" if more > 0 else "")
        return text


@dataclass
class TaskData:
    """A prepared task: its splits in standard columns, task type, label names, name and bad-row report."""

    dataset: datasets.DatasetDict
    task_type: str
    label_names: list[str]
    name: str
    report: DataReport = field(default_factory=DataReport)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# --------------------------------------------------------------------------------------------------- entry point


def load_task(name: str, *, data_dir: str | None = None, train_size: int = 2000, eval_size: int = 500, seed: int = 0,
              image_size: int = 32, strict: bool = False, max_rows: int | None = None, **hub_kwargs) -> TaskData:
    """Load a task by name into standard columns (see the module docstring), dropping and counting bad rows.

    ``name`` is ``"synthetic:<entailment|multilabel|retrieval|factors>"``, ``"multibench:<name>"`` (a MultiBench
    pickle in ``data_dir``, see ``load_multibench``), ``"fashion:<entailment|retrieval>"`` (real Fashion-MNIST
    images, see ``data.fashion``; ``data_dir`` optionally names the folder of its IDX files), a known benchmark
    (``KNOWN_DATASETS``: ``snli-ve``, ``mm-imdb``, ``food101``, ``coco``, ``flickr30k``), ``"local"`` or a folder
    path (read from ``data_dir`` / that folder), or any ``"owner/name"`` Hub id, whose columns are detected. When
    ``data_dir`` is given it is always read as a local folder, also for a known benchmark name (its task type is then
    checked). ``train_size``, ``eval_size`` and ``seed`` shape the synthetic and Fashion-MNIST tasks, ``image_size``
    the synthetic ones only. ``max_rows`` keeps the first rows of the train split, before bad rows are dropped
    (malformed lines of local files are left out first). Other keyword arguments go to ``datasets.load_dataset`` for
    Hub datasets, to ``build_synthetic_splits`` (``max_objects``, ``captions_per_image``) for synthetic tasks, to
    ``build_factor_dataset`` or to ``load_multibench``. Synthetic data is generated valid and is not checked.
    """
    if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows <= 0):
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}")
    if name == FACTOR_TASK or name.startswith(MULTIBENCH_PREFIX):
        return _load_feature_task(name, data_dir, train_size, eval_size, seed, max_rows, hub_kwargs)
    if name.startswith("synthetic:"):
        return _load_synthetic(name, train_size, eval_size, seed, image_size, max_rows, hub_kwargs)
    if name.startswith(FASHION_PREFIX):
        return _load_fashion(name, data_dir, train_size, eval_size, seed, max_rows)
    spec = KNOWN_DATASETS.get(name.lower())
    if name == "local" or data_dir is not None or os.path.isdir(name):
        folder = data_dir if data_dir is not None else (None if name == "local" else name)
        if folder is None:
            raise ValueError("load_task('local') needs data_dir: a folder with images and train.jsonl / "
                             "validation.jsonl / test.jsonl (or .csv).")
        return _load_local(name, Path(folder), strict, max_rows, spec)
    if spec is not None:
        if spec.hub_id is None:
            raise ValueError(f"{name!r} must be loaded from a local copy: pass data_dir=<folder>. {spec.description} "
                             "The folder holds the images and train.jsonl / validation.jsonl / test.jsonl (or .csv) "
                             "rows with 'image' (path relative to the folder), 'text' and 'label' or 'labels'.")
        raw = _load_hub_dataset(spec.hub_id, name, hub_kwargs)
        return _prepare_hub(name, raw, spec, strict, max_rows)
    if "/" in name:
        raw = _load_hub_dataset(name, name, hub_kwargs)
        return _prepare_hub(name, raw, None, strict, max_rows)
    raise ValueError(f"unknown dataset {name!r}; valid choices: "
                     + ", ".join([f"synthetic:{t}" for t in SYNTHETIC_TASKS] + [FACTOR_TASK, "multibench:<name>"]
                                 + [f"{FASHION_PREFIX}{t}" for t in FASHION_TASKS]
                                 + sorted(KNOWN_DATASETS))
                     + ", 'local' (with data_dir), a folder path, or an 'owner/name' Hub dataset id")


# ------------------------------------------------------------------------------------------------------ synthetic


def _load_synthetic(name: str, train_size: int, eval_size: int, seed: int, image_size: int, max_rows: int | None,
                    kwargs: dict) -> TaskData:
    task = name.split(":", 1)[1]
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; valid choices: "
                         + ", ".join(f"synthetic:{t}" for t in SYNTHETIC_TASKS))
    splits = build_synthetic_splits(task, train_size, eval_size, seed=seed, image_size=image_size, **kwargs)
    splits = datasets.DatasetDict({split: ds.cast_column("image", datasets.Image(mode="RGB"))
                                   for split, ds in splits.items()})
    if max_rows is not None and len(splits["train"]) > max_rows:
        splits["train"] = splits["train"].select(range(max_rows))
    task_type = _SYNTHETIC_TASK_TYPES[task]
    features = splits["train"].features
    if task_type == SINGLE_LABEL:
        label_names = list(features["label"].names)
    elif task_type == MULTI_LABEL:
        label_names = list(MULTILABEL_NAMES)
    else:
        label_names = []
    report = DataReport()
    for split in splits:
        report.add(split, ())
    return TaskData(splits, task_type, label_names, name, report)


def _load_fashion(name: str, data_dir: str | None, train_size: int, eval_size: int, seed: int,
                  max_rows: int | None) -> TaskData:
    """Fashion-MNIST's real images with garment questions or captions (see ``data.fashion``); ``data_dir``: the
    folder of its IDX files (default: where Debian's ``dataset-fashion-mnist`` puts them)."""
    task = name[len(FASHION_PREFIX):]
    splits = build_fashion_splits(task, train_size, eval_size, seed=seed, data_dir=data_dir)
    if max_rows is not None and len(splits["train"]) > max_rows:
        splits["train"] = splits["train"].select(range(max_rows))
    report = DataReport()
    for split in splits:
        report.add(split, ())
    task_type = RETRIEVAL if task == "retrieval" else SINGLE_LABEL
    label_names = [] if task_type == RETRIEVAL else list(splits["train"].features["label"].names)
    return TaskData(splits, task_type, label_names, name, report)


def _load_feature_task(name: str, data_dir: str | None, train_size: int, eval_size: int, seed: int,
                       max_rows: int | None, kwargs: dict) -> TaskData:
    """The factor generator (``eval_size`` rows in validation and test) or a MultiBench pickle from ``data_dir``;
    extra keyword arguments go to ``build_factor_dataset`` or ``load_multibench``."""
    if name == FACTOR_TASK:
        splits = build_factor_dataset(num_train=train_size, num_validation=eval_size, num_test=eval_size, seed=seed,
                                      **kwargs)
    elif data_dir is None:
        raise ValueError(f"{name!r} reads MultiBench's feature pickle from disk: pass data_dir=<its folder or file>")
    else:
        splits = load_multibench(name[len(MULTIBENCH_PREFIX):], data_dir, **kwargs)
    if max_rows is not None and len(splits["train"]) > max_rows:
        splits["train"] = splits["train"].select(range(max_rows))
    report = DataReport()
    for split in splits:
        report.add(split, ())
    return TaskData(splits, SINGLE_LABEL, list(splits["train"].features["label"].names), name, report)


# ---------------------------------------------------------------------------------------------------------- local


def _find_split_files(folder: Path) -> dict[str, tuple[Path, str]]:
    found: dict[str, tuple[Path, str]] = {}
    candidates = [(split, split) for split in SPLITS] + list(SPLIT_ALIASES.items())
    for stem, split in candidates:
        for extension, builder in LOCAL_FORMATS:
            path = folder / f"{stem}.{extension}"
            if path.is_file() and split not in found:
                found[split] = (path, builder)
    return found


def _csv_string_converters(path: Path) -> dict[str, type]:
    """Read text, path and list cells of a CSV file as strings (pandas would turn '42' into a number)."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return {column: str for column in header if column in _CSV_STRING_COLUMNS}


# Reading local rows files: malformed lines are found (streaming, by line number) before ``datasets`` reads a file;
# a file with malformed lines is read from a copy without them, in memory (a temporary copy has no lasting cache).

_JSONL_FIX = "Fix the line (one JSON object per line, in UTF-8) or load without strict=True to drop malformed lines."
_CSV_FIX = "Re-save the file as UTF-8 (or fix the line), or load without strict=True to drop malformed lines."
_FORMAT_NAMES = {"json": "JSON", "csv": "CSV"}
_BOM = b"\xef\xbb\xbf"


@dataclass
class _Scan:
    """What a scan of a rows file found: malformed lines as (line, problem), the lines to leave out, and whether
    readable rows remain (``rows``, only tested for zero)."""

    bad: list[tuple[int, str]] = field(default_factory=list)
    skip: set[int] = field(default_factory=set)
    rows: int = 0


def _read_rows_file(path: Path, split: str, builder: str, strict: bool, report: DataReport) -> datasets.Dataset:
    """Read one local rows file with ``datasets``, its malformed lines counted in ``report`` and left out (or, with
    ``strict``, refused)."""
    if path.suffix == ".csv":
        scan, fix = _scan_csv(path), _CSV_FIX
    elif path.suffix == ".json" and not _holds_json_lines(path):
        scan, fix = _scan_json_document(path), _JSONL_FIX
    else:
        scan, fix = _scan_json_lines(path), _JSONL_FIX
    bad = [BadLine(split, str(path), line, problem) for line, problem in scan.bad]
    if bad and strict:
        raise DataError(f"{bad[0]}. {fix}")
    if not scan.rows:
        if bad:
            line, problem = scan.bad[0]
            raise DataError(f"{path} has no readable rows: all {len(bad)} of its lines are malformed (first: line "
                            f"{line}: {problem}). Fix the file.")
        raise DataError(f"{path} has no rows. Add rows (with image, text and label, labels or captions) or "
                        "remove the file.")
    for line in bad:
        report.add_line(line)
    if not scan.skip:
        return _load_rows(path, path, split, builder)
    with tempfile.TemporaryDirectory(prefix="mmexperts-rows-") as scratch:
        cleaned = Path(scratch) / path.name
        with open(path, "rb") as source, open(cleaned, "wb") as target:
            for number, raw in enumerate(source, 1):
                if number not in scan.skip:
                    target.write(raw)
        return _load_rows(cleaned, path, split, builder, cache_dir=str(Path(scratch) / "cache"),
                          keep_in_memory=True)


def _load_rows(source: Path, path: Path, split: str, builder: str, **options) -> datasets.Dataset:
    """``datasets.load_dataset`` on ``source`` (``path`` or its cleaned copy), its errors as a ``DataError``."""
    try:
        if builder == "csv":
            options["converters"] = _csv_string_converters(source)
        return datasets.load_dataset(builder, data_files={split: str(source)}, split=split, **options)
    except Exception as exc:  # pyarrow/pandas errors; datasets hides the cause behind a generic message
        raise DataError(f"Could not read {path} as {_FORMAT_NAMES[builder]}: {_root_cause(exc)}. Give every row "
                        "the same fields, each with one type (a label is always a name or always an index).") from exc


def _root_cause(exc: BaseException) -> str:
    """The innermost message of an exception chain, shortened."""
    chain = [exc]
    while len(chain) < 20:
        cause = chain[-1].__cause__ or chain[-1].__context__
        if cause is None or cause in chain:
            break
        chain.append(cause)
    for error in reversed(chain):
        message = " ".join(str(error).split())
        if message:
            return f"{type(error).__name__}: {message[:300]}"
    return type(exc).__name__


def _utf8_problem(raw: bytes, error: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class _LineProblem(Exception):
    """A line that Python's json accepts but the Arrow JSON reader of ``datasets`` refuses."""


def _json_object(pairs: list[tuple[str, Any]]) -> dict:
    row = dict(pairs)
    if len(row) != len(pairs):
        keys = [key for key, _ in pairs]
        raise _LineProblem(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return row


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _LineProblem(f"number {text[:30]} is too large")
    return value


def _json_line_problem(raw: bytes) -> str:
    """Why one non-blank JSON Lines line is not a row ('' when it is one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _utf8_problem(raw, exc)
    try:
        value = json.loads(text, object_pairs_hook=_json_object, parse_float=_json_float)
        if "\\ud" in text.lower():  # an escaped lone surrogate is no text
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    except _LineProblem as exc:
        return f"not a valid row ({exc})"
    except UnicodeEncodeError:
        return "not valid JSON (a string holds an unpaired surrogate escape)"
    except RecursionError:
        return "not valid JSON (nested too deeply)"
    if not isinstance(value, dict):
        return f"a JSON {_json_type(value)}, not an object (one row object per line)"
    return ""


def _lines(path: Path) -> Iterable[tuple[int, bytes]]:
    """Numbered lines (from 1) of a file as bytes, without a UTF-8 byte order mark."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            yield number, raw[len(_BOM):] if number == 1 and raw.startswith(_BOM) else raw


def _scan_json_lines(path: Path) -> _Scan:
    scan = _Scan()
    for number, raw in _lines(path):
        if not raw.strip():
            continue
        problem = _json_line_problem(raw)
        if problem:
            scan.bad.append((number, problem))
            scan.skip.add(number)
        else:
            scan.rows += 1
    return scan


def _holds_json_lines(path: Path) -> bool:
    """Whether a .json file holds JSON Lines: its first non-blank line is a whole object and more lines follow."""
    first = None
    for _, raw in _lines(path):
        if not raw.strip():
            continue
        if first is not None:
            return True
        first = raw
        if _json_line_problem(raw):
            return False
    return False


def _scan_json_document(path: Path) -> _Scan:
    """Check a .json file holding one JSON document: a list of row objects (or an object of columns)."""
    data = path.read_bytes()
    data = data[len(_BOM):] if data.startswith(_BOM) else data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        start = data.rfind(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column "
                        f"{exc.start - start + 1}). Re-save the file as UTF-8.") from None
    if not text.strip():
        return _Scan()
    try:
        document = json.loads(text, object_pairs_hook=_json_object, parse_float=_json_float)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg}). Fix the file: a "
                        "JSON list of row objects, or one JSON object per line.") from None
    except _LineProblem as exc:
        raise DataError(f"{path}: not a valid rows file ({exc}). Fix the file.") from None
    except RecursionError:
        raise DataError(f"{path}: not valid JSON (nested too deeply). Fix the file: a JSON list of row objects, or "
                        "one JSON object per line.") from None
    if isinstance(document, list):
        wrong = next((i for i, item in enumerate(document) if not isinstance(item, dict)), None)
        if wrong is not None:
            raise DataError(f"{path}: item {wrong} (0-based) of the list is a JSON {_json_type(document[wrong])}, "
                            "not an object. Make every item a row object (with image, text and label, labels or "
                            "captions).")
        return _Scan(rows=len(document))
    if isinstance(document, dict):
        return _Scan(rows=1)
    raise DataError(f"{path} holds a JSON {_json_type(document)}; expected a list of row objects or one JSON object "
                    "per line. Fix the file.")


def _scan_csv(path: Path) -> _Scan:
    """Find CSV records that are not UTF-8 (a record may span lines); a header that is not UTF-8 is refused."""
    undecodable: dict[int, str] = {}
    nonblank = 0
    for number, raw in _lines(path):
        nonblank += bool(raw.strip())
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            undecodable[number] = _utf8_problem(raw, exc)
    if not undecodable:
        return _Scan(rows=max(nonblank - 1, 0))
    scan = _Scan()
    consumed: list[int] = []

    def text_lines():
        for number, raw in _lines(path):
            consumed.append(number)
            yield raw.decode("utf-8", "surrogateescape")

    reader = csv.reader(text_lines())
    header = False
    try:
        for record in reader:
            numbers, consumed[:] = list(consumed), []
            broken = [n for n in numbers if n in undecodable]
            if broken and not header:
                raise DataError(f"{path}, line {broken[0]}: the header is {undecodable[broken[0]]}. Re-save the "
                                "file as UTF-8.")
            if broken:
                scan.bad.append((broken[0], undecodable[broken[0]]))
                scan.skip.update(numbers)
            elif record:
                scan.rows += header
                header = True
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: {exc}. Fix the line.") from None
    return scan


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


# ------------------------------------------------------------------------------------------------------------ hub


def _hub_offline() -> bool:
    flags = [os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", "")]
    if any(flag.strip().upper() in ("1", "ON", "YES", "TRUE") for flag in flags):
        return True
    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def _load_hub_dataset(hub_id: str, name: str, kwargs: dict) -> datasets.DatasetDict:
    """``datasets.load_dataset`` with errors that say what to do when the Hub cannot be reached."""
    if kwargs.get("streaming"):
        raise ValueError("streaming datasets are not supported: bad-row checks and DataLoader shuffling need a "
                         "map-style dataset; use split slicing (split='train[:10000]') to load less")
    local_help = ("or pass data_dir=<folder> with a local copy (images plus train.jsonl / validation.jsonl / "
                  "test.jsonl or .csv rows with 'image', 'text' and 'label' or 'labels').")
    which = f"{hub_id!r}" + (f" (for {name!r})" if name != hub_id else "")
    try:
        loaded = datasets.load_dataset(hub_id, **kwargs)
    except datasets.exceptions.DatasetNotFoundError as exc:
        if _hub_offline():
            raise ConnectionError(f"cannot load dataset {which}: offline mode is on (HF_HUB_OFFLINE=1) and it is "
                                  f"not in the local cache. Download it once with network access, "
                                  + local_help) from exc
        raise ValueError(f"dataset {which} was not found on the Hugging Face Hub (check the id, or log in for a "
                         f"gated dataset), " + local_help) from exc
    except (ConnectionError, TimeoutError, OSError) as exc:
        if _hub_offline():
            raise ConnectionError(f"cannot load dataset {which}: offline mode is on (HF_HUB_OFFLINE=1) and it is "
                                  f"not in the local cache. Unset HF_HUB_OFFLINE on a machine with network access "
                                  f"to download it once, " + local_help) from exc
        raise ConnectionError(f"cannot load dataset {which} from the Hugging Face Hub: the network or the Hub is "
                              f"unreachable ({type(exc).__name__}: {exc}). Retry with network access, "
                              + local_help) from exc
    if isinstance(loaded, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise ValueError("streaming datasets are not supported")
    if isinstance(loaded, datasets.Dataset):
        split = str(kwargs.get("split", "train")).split("[")[0].split("+")[0]
        loaded = datasets.DatasetDict({split: loaded})
    return datasets.DatasetDict({SPLIT_ALIASES.get(split, split): ds for split, ds in loaded.items()})


def _prepare_hub(name: str, raw: datasets.DatasetDict, spec: HubDatasetSpec | None, strict: bool,
                 max_rows: int | None) -> TaskData:
    first = raw[next(iter(raw))]
    features = first.features
    columns = first.column_names
    if spec is not None:
        image_column, text_column = spec.image_column, spec.text_column
        label_column, id_column = spec.label_column, spec.id_column
        wanted = {"image": image_column, "text": text_column, "label": label_column, "id": id_column}
        missing = {role: col for role, col in wanted.items() if col is not None and col not in columns}
        if missing:
            raise ValueError(f"{name!r} ({spec.hub_id}) lacks the expected column(s) "
                             f"{', '.join(f'{c!r} ({r})' for r, c in missing.items())}; {_describe_columns(raw)}")
        task_type = spec.task_type
    else:
        image_column = next((c for c in columns if isinstance(features[c], datasets.Image)), None)
        if image_column is None:
            raise ValueError(f"{name!r} has no datasets.Image column; {_describe_columns(raw)}")
        label_column = _pick(columns, LABEL_COLUMNS)
        text_column = next((c for c in TEXT_COLUMNS if c in columns and _is_string(features[c])), None)
        if label_column is None:
            text_column = next((c for c in TEXT_COLUMNS + CAPTION_COLUMNS
                                if c in columns and _is_string_list(features[c])), text_column)
        if text_column is None:
            raise ValueError(f"{name!r} has no text column (a string column named one of "
                             f"{', '.join(TEXT_COLUMNS)}); {_describe_columns(raw)}")
        if label_column is None:
            if not _is_string_list(features[text_column]):
                raise ValueError(f"{name!r} has no label column ('label' or 'labels') and no list-of-captions "
                                 f"column for retrieval; {_describe_columns(raw)}")
            task_type = RETRIEVAL
        else:
            task_type = MULTI_LABEL if _list_inner(features[label_column]) is not None else SINGLE_LABEL
        id_column = _pick(columns, IMAGE_ID_COLUMNS) if task_type == RETRIEVAL else None
    label_names = None
    if label_column is not None:
        label_feature = features[label_column]
        inner = _list_inner(label_feature)
        class_label = label_feature if isinstance(label_feature, datasets.ClassLabel) else inner
        if isinstance(class_label, datasets.ClassLabel):
            label_names = list(class_label.names)
        elif spec is not None and spec.label_names:
            label_names = list(spec.label_names)
    if id_column is not None and not _is_integer(features[id_column]):
        id_column = None  # non-numeric ids (file names, strings) are replaced by running row numbers
    columns_spec = _Columns(image_column, text_column, label_column, id_column)
    return _prepare(name, raw, columns_spec, task_type, label_names, strict, max_rows, base_dir=None)


# ------------------------------------------------------------------------------------------------------- checking


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


__all__ = ["BAD_ROW_REASONS", "KNOWN_DATASETS", "MALFORMED_LINE", "TASK_TYPES", "BadLine", "DataReport",
           "HubDatasetSpec", "TaskData", "load_task"]
