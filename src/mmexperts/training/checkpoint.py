"""Resumable checkpoints: Accelerate's state (safetensors weights; optimizer, scheduler and RNG states read back with
``weights_only=True``), the training progress as JSON, and a manifest of every file's size and sha256 written last.

A folder without a valid manifest is incomplete and never resumed from; nothing in a checkpoint is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from safetensors import safe_open

from ..atomic import write_file_atomic
from ..checksums import file_sha256
from ..errors import CheckpointError

MANIFEST_FILE = "checkpoint.json"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
MANIFEST_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
RNG_PATTERN = re.compile(r"^random_states_\d+\.pkl$")
# what save_state and the recipe write; all read back as safetensors, JSON or weights_only=True loads
KNOWN_FILES = re.compile(r"^(model(_\d+)?\.safetensors|(optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.bin|"
                         r"random_states_\d+\.pkl|scaler\.pt|" + re.escape(STATE_FILE) + ")$")


@dataclass
class TrainingState:
    """Progress saved with every checkpoint: optimizer steps taken, the best evaluation so far, and the steps skipped
    because the loss or a gradient was not finite."""

    step: int = 0
    best_metric: float | None = None
    best_step: int = -1
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> TrainingState:
        """Read ``trainer_state.json``; every field is checked, so a damaged file is refused, not half-applied."""
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} cannot be read as JSON ({error}); resume from another checkpoint.") from None
        expected = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) != expected:
            raise CheckpointError(f"{path} must hold a JSON object with the keys {sorted(expected)}, got {values!r}; "
                                  "resume from another checkpoint.")
        integers = ("step", "best_step", "nonfinite_steps", "nonfinite_in_a_row")
        if any(not isinstance(values[k], int) or isinstance(values[k], bool) for k in integers) or \
                min(values["step"], values["nonfinite_steps"], values["nonfinite_in_a_row"]) < 0 or not (
                values["best_metric"] is None or isinstance(values["best_metric"], (int, float))
                and not isinstance(values["best_metric"], bool) and math.isfinite(values["best_metric"])):
            raise CheckpointError(f"{path} holds invalid values {values!r}: the step counts must be integers (>= 0 "
                                  "but best_step) and best_metric a finite number or null.")
        return cls(**values)


def write_manifest(folder: str | os.PathLike, step: int) -> Path:
    """Record the size and sha256 of every file in ``folder``; written last, it marks the checkpoint complete."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    manifest = {"format_version": MANIFEST_VERSION, "step": step, "files": files}
    return write_file_atomic(folder / MANIFEST_FILE, json.dumps(manifest, indent=2))


def verify_checkpoint(folder: str | os.PathLike) -> list[str]:
    """Check ``folder`` against its manifest; returns the RNG-state files that are missing or damaged (resuming
    without them is possible but no longer exact). Anything else wrong raises ``CheckpointError``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Checkpoint {folder} does not exist; pass a checkpoint folder (step_N) or 'latest'.")
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"Checkpoint {folder} has no {MANIFEST_FILE}: it is incomplete (the write was "
                              "interrupted) or was not written by this version; resume from another checkpoint.")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest["format_version"] != MANIFEST_VERSION or not isinstance(files, dict):
            raise ValueError(f"format_version {manifest['format_version']!r}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{manifest_path} is not a valid manifest ({error}); the checkpoint is damaged, resume "
                              "from another one.") from None
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}
    unexpected = sorted(present - set(files))
    if unexpected:
        raise CheckpointError(f"Checkpoint {folder} holds files its manifest does not list: {unexpected}; they were "
                              "added after it was written and are never read. Remove them or resume from another "
                              "checkpoint.")
    foreign = sorted(name for name in files if not KNOWN_FILES.match(name))
    if foreign:
        raise CheckpointError(f"Checkpoint {folder} lists files the recipe never writes: {foreign}; they are never "
                              "read (a pickle can run code). Remove them or resume from another checkpoint.")
    rng_problems, problems = [], []
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            problem = f"{name} is missing"
        elif path.stat().st_size != record.get("size") or file_sha256(path) != record.get("sha256"):
            problem = f"{name} does not match its recorded size and sha256"
        else:
            continue
        (rng_problems if RNG_PATTERN.match(Path(name).name) else problems).append(problem)
    if problems:
        raise CheckpointError(f"Checkpoint {folder} is damaged: {'; '.join(problems)}. Resume from another "
                              "checkpoint.")
    for required in (MODEL_FILE, STATE_FILE):
        if required not in files:
            raise CheckpointError(f"Checkpoint {folder} lacks {required}; resume from another checkpoint.")
    return rng_problems


def check_adapter_keys(folder: str | os.PathLike, expected: set[str]) -> None:
    """Refuse a checkpoint whose adapter tensors are not exactly the ones the model trains."""
    path = Path(folder) / MODEL_FILE
    try:
        with safe_open(str(path), "pt") as f:
            saved = set(f.keys())
    except Exception as error:  # safetensors reports damage with its own error types
        raise CheckpointError(f"{path} cannot be read as safetensors ({error}); resume from another "
                              "checkpoint.") from None
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {folder} does not match this model's adapter: {len(missing)} of {len(expected)} adapter "
            f"tensors missing {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}. Resume with the same "
            "method, method_config and backbones the checkpoint was written with."
        )


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Folders named ``step_N`` under ``folder`` that hold a manifest, oldest first (``verify_checkpoint`` checks
    their files)."""
    return [path for path in _step_folders(folder) if (path / MANIFEST_FILE).is_file()]


def checkpoint_step(path: Path) -> int:
    """The step of a ``step_N`` checkpoint folder."""
    return int(CHECKPOINT_PATTERN.match(path.name).group(1))


def _step_folders(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> tuple[Path, list[str]]:
    """The newest checkpoint under ``folder`` that verifies, and why each newer one was skipped."""
    skipped = []
    for path in reversed(_step_folders(folder)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            skipped.append(f"{path.name}: {error}")
            continue
        return path, skipped
    detail = f" Skipped: {' | '.join(skipped)}" if skipped else ""
    raise CheckpointError(f"--resume_from_checkpoint latest: no complete checkpoint under {folder}.{detail}")


__all__ = ["CHECKPOINT_PATTERN", "MANIFEST_FILE", "STATE_FILE", "TrainingState", "check_adapter_keys",
           "checkpoint_step",
           "latest_checkpoint", "list_checkpoints", "verify_checkpoint", "write_manifest"]
