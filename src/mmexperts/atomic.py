"""Atomic, durable writes of folders: build next to the target, fsync, then swap it in, so readers never see half a
folder and a crash or power loss leaves either the old folder or the new one.

A swap is two renames (``path`` -> ``.name.old-PID``, staging -> ``path``); ``recover_directory`` undoes a swap
that a kill interrupted between them and removes what dead writers left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

try:  # POSIX advisory locks serialise builders across processes; elsewhere the atomic rename alone protects
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|tmp)-(?P<pid>\d+)$")


def staging_path(path: str | os.PathLike, pid: int | None = None) -> Path:
    """The hidden sibling a writer with process id ``pid`` (default: this process) builds ``path`` in."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial-{os.getpid() if pid is None else pid}")


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file under ``path`` and the folders themselves to disk."""
    path = Path(path)
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(root)


def _fsync_directory(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:  # some filesystems refuse fsync on folders
        if error.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def commit_directory(staging: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Flush ``staging`` to disk and swap it in as ``path`` (an older ``path`` is removed after)."""
    staging, path = Path(staging), Path(path)
    fsync_tree(staging)
    retired = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(retired, ignore_errors=True)
    if path.exists():
        os.replace(path, retired)
    os.replace(staging, path)
    _fsync_directory(path.parent)
    shutil.rmtree(retired, ignore_errors=True)
    return path


def write_file_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write one file through a flushed temporary sibling and a rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)
    return path


def _alive(pid: int) -> bool:
    """Whether another process with this id runs (this process's own leftovers are from a failed write or from a
    predecessor that had the same id, so they count as dead)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_directory(folder: str | os.PathLike) -> list[str]:
    """Finish or undo swaps interrupted in ``folder`` and remove staging folders of dead writers.

    A target missing while its ``.name.old-PID`` exists gets the old folder back (the swap never completed, so the
    old folder is the last complete one). Returns what was done, one line per action.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    actions = []
    for entry in sorted(folder.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if not match or _alive(int(match["pid"])):
            continue
        target = folder / match["name"]
        if match["kind"] == "old" and not target.exists():
            os.replace(entry, target)
            actions.append(f"restored {target} from an interrupted swap")
        else:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            actions.append(f"removed leftover {entry.name}")
    if actions:
        _fsync_directory(folder)
        for action in actions:
            logger.warning("%s: %s", folder, action)
    return actions


@contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary sibling folder; on success it replaces ``path`` durably (see ``commit_directory``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path.parent)
    staging = staging_path(path)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit_directory(staging, path)


@contextmanager
def exclusive_lock(lock_path: str | os.PathLike, on_wait=None):
    """Hold an exclusive advisory lock on ``lock_path`` (waiting for it), so one process builds at a time;
    ``on_wait()`` is called when another process holds it."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
