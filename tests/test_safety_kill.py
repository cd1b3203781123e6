"""SIGKILL in the middle of a write: the recipe resumes from the last complete checkpoint, cleans up what the dead
writer left, undoes a half-done folder swap, and ends bit-identical to a run that was never interrupted.

The kills are deterministic: ``tests/scripts/train_killed.py`` runs the recipe and kills itself at a chosen point
(``MMEXPERTS_KILL``); every restart is the plain ``recipes/train.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmexperts.training import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train.py"
KILLER = ROOT / "tests" / "scripts" / "train_killed.py"
MAX_STEPS, SAVE_STEPS, KILL_STEP = 12, 2, 6
ADAPTER_FILE = "adapter_model.safetensors"

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def start(backbones, output_dir: Path, *extra: str, kill: str | None = None) -> subprocess.Popen:
    """Start the recipe (or, with ``kill``, the self-killing script) on the tiny task, one thread per process."""
    vision, text = backbones
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MMEXPERTS_KILL"):
        env.pop(variable, None)
    if kill:
        env["MMEXPERTS_KILL"] = kill
    command = [sys.executable, str(KILLER if kill else RECIPE), "--vision_model", vision, "--text_model", text,
               "--output_dir", str(output_dir), "--train_size", "64", "--eval_size", "32", "--batch_size", "8",
               "--eval_batch_size", "16", "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS),
               "--eval_steps", "4", "--warmup_steps", "1", "--logging_steps", "1", "--learning_rate", "1e-2",
               "--method_config", "{init_weights: false}", "--no_unimodal_baselines", *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait(process: subprocess.Popen, returncode: int = 0) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == returncode, f"exit {process.returncode}, expected {returncode}:\n{output[-4000:]}"
    return output


def leftovers(folder: Path) -> list[str]:
    """Hidden entries anywhere under ``folder``: staging folders, retired folders, temporary files."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


@pytest.fixture(scope="module")
def straight(backbones, tmp_path_factory):
    """The uninterrupted run, started in the background; call it to wait for its output folder."""
    folder = tmp_path_factory.mktemp("straight")
    process = start(backbones, folder)

    def finished() -> Path:
        if process.returncode is None:
            wait(process)
        return folder

    yield finished
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_resumes_from_the_previous_one_bit_identically(backbones, straight, tmp_path):
    run = tmp_path / "run"
    killed = start(backbones, run, kill=f"checkpoint:{KILL_STEP}")  # runs alongside the uninterrupted one
    wait(killed, -signal.SIGKILL)
    checkpoints = run / "checkpoints"
    partial = checkpoints / f".step_{KILL_STEP}.partial-{killed.pid}"
    previous = KILL_STEP - SAVE_STEPS
    # save_state, the progress JSON and the manifest were written, the rename into place was not
    assert {"model.safetensors", "trainer_state.json", "checkpoint.json"} <= {p.name for p in partial.iterdir()}
    assert not (checkpoints / f"step_{KILL_STEP}").exists()
    assert [p.name for p in list_checkpoints(checkpoints)] == [f"step_{previous - SAVE_STEPS}", f"step_{previous}"]

    output = wait(start(backbones, run, "--resume_from_checkpoint", "latest"))
    assert f"{checkpoints}: removed leftover {partial.name}" in output
    assert f"Resumed from {checkpoints / f'step_{previous}'} at step {previous}." in output
    assert leftovers(run) == []
    assert [p.name for p in list_checkpoints(checkpoints)] == [f"step_{MAX_STEPS - SAVE_STEPS}", f"step_{MAX_STEPS}"]

    reference = straight()
    for name in ("adapter", "best"):
        assert (run / name / ADAPTER_FILE).read_bytes() == (reference / name / ADAPTER_FILE).read_bytes(), name
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())


@pytest.mark.slow
def test_sigkill_between_the_two_renames_of_a_swap_restores_the_old_folder(backbones, straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight(), run)  # a finished run: adapter/ exists, so finishing again swaps it
    expected = (run / "adapter" / ADAPTER_FILE).read_bytes()

    killed = start(backbones, run, "--resume_from_checkpoint", "latest", kill="swap:adapter")
    output = wait(killed, -signal.SIGKILL)
    assert f"Resumed from {run / 'checkpoints' / f'step_{MAX_STEPS}'} at step {MAX_STEPS}." in output
    retired, partial = run / f".adapter.old-{killed.pid}", run / f".adapter.partial-{killed.pid}"
    assert not (run / "adapter").exists()  # killed after adapter -> .adapter.old-PID, before staging -> adapter
    assert (retired / ADAPTER_FILE).read_bytes() == expected and (partial / ADAPTER_FILE).is_file()

    output = wait(start(backbones, run, "--resume_from_checkpoint", "latest"))
    assert f"{run}: restored {run / 'adapter'} from an interrupted swap" in output
    assert f"{run}: removed leftover {partial.name}" in output
    assert leftovers(run) == []
    assert (run / "adapter" / ADAPTER_FILE).read_bytes() == expected
