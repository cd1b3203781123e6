"""Run the training recipe and SIGKILL this process at a chosen point of a write, as a crash or an OOM kill would.

    MMEXPERTS_KILL=checkpoint:STEP python tests/scripts/train_killed.py --output_dir ... [TrainConfig flags]
    MMEXPERTS_KILL=swap:NAME       python tests/scripts/train_killed.py --output_dir ... [TrainConfig flags]

``checkpoint:STEP``: at the checkpoint of step STEP, once ``save_state``, the progress JSON and the manifest are in the
staging folder ``checkpoints/.step_STEP.partial-PID`` and before ``commit_directory`` renames it to ``step_STEP``.
``swap:NAME``: inside the first durable swap of ``output_dir/NAME`` (``best`` or ``adapter``) that replaces an existing
folder, right after ``NAME -> .NAME.old-PID`` and before ``.NAME.partial-PID -> NAME``.
Without MMEXPERTS_KILL it is the plain recipe.
"""

import os
import signal
import sys
from pathlib import Path

import mmexperts.atomic as atomic
from mmexperts.training import loop, parse_config, train


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_checkpoint(step: int) -> None:
    commit = loop.commit_directory  # the Trainer calls the name it imported into its own module

    def commit_or_die(staging, path):
        if Path(path).name == f"step_{step}":
            die()
        return commit(staging, path)

    loop.commit_directory = commit_or_die


class _KillAfterRetiring:
    """``os`` for ``mmexperts.atomic`` whose ``replace`` dies right after moving ``NAME`` aside."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attribute):
        return getattr(os, attribute)

    def replace(self, source, destination):
        os.replace(source, destination)
        if Path(source).name == self.name and Path(destination).name.startswith(f".{self.name}.old-"):
            die()


if __name__ == "__main__":
    kind, _, value = os.environ.get("MMEXPERTS_KILL", "").partition(":")
    if kind == "checkpoint":
        kill_at_checkpoint(int(value))
    elif kind == "swap":
        atomic.os = _KillAfterRetiring(value)
    elif kind:
        raise SystemExit(f"MMEXPERTS_KILL={kind}:{value}: expected checkpoint:STEP or swap:NAME")
    train(parse_config())
