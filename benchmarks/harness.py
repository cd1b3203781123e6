"""What the benchmarks share: the machine's description, a process's memory marks (Linux /proc), Markdown tables,
timing and the ratios of timings.

Every report describes its run with :func:`environment` (one line: CPU, threads, load, versions, commit), or with
:func:`run_footer`, which adds the run's duration in front of it. Its tables are :func:`markdown_table`'s; times come
from :func:`time_calls` (one callable, repeated) or :func:`time_rounds` (several, interleaved), and are compared with
:func:`median_ratio` and :func:`paired_ratio`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
PACKAGES = ("torch", "transformers", "peft", "mmexperts")  # the versions every environment line names, after Python
Name = TypeVar("Name", bound=Hashable)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit(folder: Path) -> str:
    """The short commit of the checkout holding ``folder``, or "unknown"."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001  (no git, not a checkout...)
        return "unknown"


def uncommitted(folder: Path) -> bool:
    """Whether the checkout holding ``folder`` has uncommitted changes to tracked files (False where git can't say)."""
    try:
        return bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                   capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:  # noqa: BLE001  (no git, not a checkout...)
        return False


def package_version(name: str) -> str:
    """A package's version: the imported module's ``__version__``, else the installed distribution's, else "absent"."""
    module = sys.modules.get(name)
    if getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def load_average() -> str:
    """The 1 / 5 / 15 minute load averages now, as "a/b/c", or "unknown"."""
    try:
        return "/".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def environment(threads: int | None = None, extra: dict[str, str] | None = None, folder: Path = HERE) -> str:
    """One line describing where and with what a benchmark ran, without a final full stop.

    CPU model, logical CPUs, torch threads (``threads``, default ``torch.get_num_threads()`` of this process: pass
    it where the work runs elsewhere, e.g. per worker process), the load average at call time, the versions of
    Python, torch, transformers, peft and mmexperts, then ``extra`` (a benchmark's own packages, name -> version,
    e.g. ``{"faiss": faiss.__version__}``), and the commit of the checkout holding ``folder`` (marked when it has
    uncommitted changes). Versions come from the imported modules where loaded, else from package metadata, so the
    call imports nothing but torch.
    """
    import torch

    threads = torch.get_num_threads() if threads is None else threads
    versions = [f"Python {platform.python_version()}", *(f"{name} {package_version(name)}" for name in PACKAGES),
                *(f"{name} {version}" for name, version in (extra or {}).items())]
    commit = git_commit(folder) + (" + uncommitted changes" if uncommitted(folder) else "")
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, {threads} torch thread{'s' if threads != 1 else ''}, "
            f"load average (1/5/15 min) {load_average()}; {', '.join(versions)}; commit {commit}")


def status_kib(field: str) -> int | None:
    """A field of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``...), or None where there is none."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def run_footer(seconds: float, folder: Path = HERE, threads: int | None = None,
               extra: dict[str, str] | None = None) -> str:
    """One sentence: how long a run took, then its :func:`environment`."""
    return f"{seconds:.0f} s on {environment(threads, extra, folder)}."


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = (),
                   compact: bool = False) -> list[str]:
    """A Markdown table's lines: the header, the separator, then one line per row of already formatted cells.

    ``right`` holds the indices of the right-aligned columns (``---:``); ``compact`` writes the separator without
    spaces (``|---|---:|`` instead of ``| --- | ---: |``). An empty cell is written as one space (``| |``).
    """
    aligned = set(right)
    marks = ["---:" if index in aligned else "---" for index in range(len(columns))]
    lines = [_table_row(columns), "|" + "|".join(marks) + "|" if compact else "| " + " | ".join(marks) + " |"]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row of {len(row)} cells in a table of {len(columns)} columns: {row!r}")
        lines.append(_table_row(row))
    return lines


def _table_row(cells: Sequence[str]) -> str:
    return "|" + "|".join(f" {cell} " if cell != "" else " " for cell in cells) + "|"


def time_calls(call: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """Seconds (``time.perf_counter``) of each of ``repeats`` calls of ``call``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def time_rounds(calls: Mapping[Name, Callable[[], object]], rounds: int, warmup: int = 0,
                setup: Callable[[Name], object] | None = None) -> dict[Name, list[float]]:
    """Seconds of each of ``calls`` per round, ``rounds`` rounds after ``warmup`` more whose times are dropped.

    Every round calls each once; round i of them all calls them in their order rotated by ``i - warmup`` (the first
    measured round keeps it), so that machine noise hits them alike. ``setup(name)`` runs untimed before each call.
    """
    names = list(calls)
    times: dict[Name, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        shift = (index - warmup) % len(names)
        for name in names[shift:] + names[:shift]:
            if setup is not None:
                setup(name)
            seconds = time_calls(calls[name], 1)[0]
            if index >= warmup:
                times[name].append(seconds)
    return times


def median_ratio(numerator: Iterable[float], denominator: Iterable[float]) -> float:
    """The ratio of the medians of two samples."""
    return statistics.median(numerator) / statistics.median(denominator)


def paired_ratio(numerator: Iterable[float], denominator: Iterable[float]) -> float:
    """The median of the per-round ratios of two paired samples (round i of one over round i of the other)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
