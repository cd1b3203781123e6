"""What the benchmarks share: the machine's description and a process's memory marks (Linux /proc).

Every report describes its run with :func:`environment` (one line: CPU, threads, load, versions, commit), or with
:func:`run_footer`, which adds the run's duration in front of it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = ("torch", "transformers", "peft", "mmexperts")  # the versions every environment line names, after Python


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
