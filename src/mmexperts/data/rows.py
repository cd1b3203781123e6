"""Read one local rows file (JSON Lines, a JSON list or CSV) with ``datasets``, its malformed lines found first.

A line that is not UTF-8, not valid JSON or not a JSON object (a CSV record that is not UTF-8) is a ``malformed_line``
bad row: dropped and listed with its file and line in ``DataReport.bad_lines``, or, with ``strict=True``, a
``DataError`` naming the file and line. An empty or unreadable file is a ``DataError``.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from ..errors import DataError
from .checks import TEXT_COLUMNS
from .tasks import BadLine, DataReport

_CSV_STRING_COLUMNS: tuple[str, ...] = ("image", "file_name", "captions", "labels") + TEXT_COLUMNS


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
