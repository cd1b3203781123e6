"""Task types, standard splits and what a loaded task is: ``TaskData`` with its bad-row ``DataReport``.

Every task comes back as a ``TaskData`` whose ``DatasetDict`` has the same columns whatever the source:

* single-label classification: ``image`` (``datasets.Image``, RGB), ``text`` (str), ``label`` (``ClassLabel``);
* multi-label classification: ``image``, ``text``, ``labels`` (list of 0.0/1.0 floats, one per label name);
* retrieval: ``image``, ``captions`` (list of str), ``image_id`` (int);
* feature-sequence classification (``"synthetic:factors"``, ``"multibench:<name>"``): ``modality_a`` and
  ``modality_b`` (float32 ``Array2D`` [seq_len, dim]) and ``label`` (``ClassLabel``), splits train/validation/test.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import datasets

TASK_TYPES = ("single_label_classification", "multi_label_classification", "retrieval")
SINGLE_LABEL, MULTI_LABEL, RETRIEVAL = TASK_TYPES
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_ALIASES: dict[str, str] = {"val": "validation", "valid": "validation", "dev": "validation"}
BAD_ROW_REASONS: tuple[str, ...] = ("missing_image", "corrupt_image", "empty_text", "unknown_label")
MALFORMED_LINE = "malformed_line"  # counted only when it occurs (local files)
_SHOWN_BAD_LINES = 5


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

    @property
    def eval_split(self) -> str:
        """The split a run evaluates on: ``validation`` where the task has one, else ``test``."""
        return "validation" if "validation" in self.dataset else "test"


__all__ = ["BAD_ROW_REASONS", "MALFORMED_LINE", "MULTI_LABEL", "RETRIEVAL", "SINGLE_LABEL", "SPLITS", "TASK_TYPES",
           "BadLine", "DataReport", "TaskData"]
