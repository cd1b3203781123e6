"""Resuming is safe and exact or refuses clearly: no pickles, complete checkpoints only, adapter keys checked, RNG
states warned about, interrupted swaps recovered, non-finite steps skipped and counted."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmexperts import MoPEConfig
from mmexperts.atomic import atomic_directory, commit_directory, recover_directory, staging_path
from mmexperts.errors import CheckpointError, ConfigError, NonFiniteLossError
from mmexperts.training import TrainConfig, Trainer, list_checkpoints, train
from mmexperts.training.checkpoint import MANIFEST_FILE, STATE_FILE, write_manifest

from conftest import adapter_weights, tiny_config


@pytest.fixture(scope="module")
def finished_run(backbones, tmp_path_factory) -> Path:
    """A 6-step run with checkpoints at steps 3 and 6."""
    folder = tmp_path_factory.mktemp("run")
    train(tiny_config(backbones, folder))
    return folder


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


def resume(backbones, folder: Path, checkpoint: str = "latest", **overrides) -> dict:
    return train(tiny_config(backbones, folder, resume_from_checkpoint=checkpoint, **overrides))


class Payload:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoints_hold_json_progress_and_a_manifest_but_no_pickled_state(finished_run):
    step = finished_run / "checkpoints" / "step_6"
    names = {p.name for p in step.iterdir()}
    assert {STATE_FILE, MANIFEST_FILE, "model.safetensors"} <= names
    assert not any(name.startswith("custom_checkpoint") for name in names)
    assert json.loads((step / STATE_FILE).read_text())["step"] == 6
    manifest = json.loads((step / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == names - {MANIFEST_FILE}


def test_resume_never_unpickles_a_planted_custom_state(backbones, finished_run, tmp_path):
    folder = copy_run(finished_run, tmp_path)
    step = folder / "checkpoints" / "step_3"
    marker = tmp_path / "pwned"
    with open(step / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0\.pkl.*never read"):
        resume(backbones, folder, str(step))
    write_manifest(step, 3)  # even listed in a rewritten manifest, it is never loaded
    with pytest.raises(CheckpointError, match=r"lists files the recipe never writes: \['custom_checkpoint_0\.pkl'\]"):
        resume(backbones, folder, str(step))
    assert not marker.exists()
    (step / "custom_checkpoint_0.pkl").unlink()
    write_manifest(step, 3)
    assert resume(backbones, folder, str(step))["steps"] == 6


@pytest.mark.parametrize("keep", [0, 0.5])
def test_checkpoint_missing_adapter_tensors_is_refused(backbones, finished_run, tmp_path, keep):
    folder = copy_run(finished_run, tmp_path)
    step = folder / "checkpoints" / "step_3"
    tensors = load_file(step / "model.safetensors")
    kept = dict(sorted(tensors.items())[:int(len(tensors) * keep)])
    save_file(kept, str(step / "model.safetensors"))
    write_manifest(step, 3)
    with pytest.raises(CheckpointError, match=rf"step_3 does not match .*{len(tensors) - len(kept)} of "
                                              rf"{len(tensors)} adapter tensors missing"):
        resume(backbones, folder, str(step))


def test_damaged_file_is_named(backbones, finished_run, tmp_path):
    folder = copy_run(finished_run, tmp_path)
    step = folder / "checkpoints" / "step_3"
    data = (step / "optimizer.bin").read_bytes()
    (step / "optimizer.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"step_3 is damaged: optimizer\.bin does not match"):
        resume(backbones, folder, str(step))


def test_missing_rng_state_warns_or_fails_with_strict_resume(backbones, finished_run, tmp_path, capsys):
    folder = copy_run(finished_run, tmp_path)
    step = folder / "checkpoints" / "step_3"
    (step / "random_states_0.pkl").unlink()
    with pytest.raises(CheckpointError, match=r"random_states_0\.pkl is missing.*drop --strict_resume"):
        resume(backbones, folder, str(step), strict_resume=True)
    resume(backbones, folder, str(step))
    assert "will not exactly repeat an uninterrupted one" in capsys.readouterr().out


def test_latest_skips_incomplete_checkpoints_and_says_why(backbones, finished_run, tmp_path, capsys):
    folder = copy_run(finished_run, tmp_path)
    (folder / "checkpoints" / "step_9").mkdir()  # empty, as a kill before anything was written
    (folder / "checkpoints" / "step_6" / MANIFEST_FILE).unlink()  # written, but never marked complete
    assert [p.name for p in list_checkpoints(folder / "checkpoints")] == ["step_3"]
    results = resume(backbones, folder)
    out = capsys.readouterr().out
    assert "Skipped checkpoint step_9" in out and "Skipped checkpoint step_6" in out
    assert f"Resumed from {folder / 'checkpoints' / 'step_3'} at step 3" in out
    assert results["steps"] == 6
    for step in ("step_3", "step_6", "step_9"):
        (folder / "checkpoints" / step / MANIFEST_FILE).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint under .*Skipped: step_9"):
        resume(backbones, folder)


def test_interrupted_swap_is_restored_and_leftovers_removed(tmp_path):
    target = tmp_path / "best"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("old")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    os.replace(target, target.with_name(f".best.old-{dead}"))  # a kill between the two renames of a swap
    (tmp_path / f".adapter.partial-{dead}").mkdir()
    (tmp_path / f".best.partial-{os.getppid()}").mkdir()  # another live writer's staging folder stays
    (tmp_path / f".metrics.json.tmp-{os.getpid()}").write_text("{")  # this pid's own leftovers count as dead
    actions = recover_directory(tmp_path)
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".best.partial-{os.getppid()}", "best"]
    assert len(actions) == 3
    (tmp_path / f".best.partial-{os.getppid()}").rmdir()
    staging = staging_path(target)
    staging.mkdir()
    (staging / "weights").write_text("new")
    commit_directory(staging, target)
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_trainer_start_up_recovers_best_from_an_interrupted_swap(backbones, finished_run, tmp_path):
    folder = copy_run(finished_run, tmp_path)
    best = adapter_weights(folder / "best")
    os.replace(folder / "best", folder / f".best.old-{2**22 + 7}")
    Trainer(tiny_config(backbones, folder, resume_from_checkpoint="latest")).setup()
    for key, value in adapter_weights(folder / "best").items():
        assert torch.equal(value, best[key])


@pytest.mark.parametrize("field, value", [("save_total_limit", 0), ("learning_rate", math.nan),
                                          ("max_grad_norm", math.inf), ("max_nonfinite_in_a_row", 0)])
def test_train_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError, match=field) as error:
        TrainConfig(**{field: value})
    assert error.value.field == field


@pytest.mark.parametrize("field", ["router_temperature", "importance_loss_weight", "router_noise_std",
                                   "prompt_dropout", "importance_threshold"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_method_configs_refuse_non_finite_floats(field, value):
    with pytest.raises(ConfigError, match=field):
        MoPEConfig(**{field: value})


def _poison(steps: set[int]):
    """A ``Trainer.model_inputs`` that fills the pixels with NaN on the given (0-based) optimizer steps."""
    original = Trainer.model_inputs

    def model_inputs(self, batch, return_loss=True):
        batch = original(self, batch, return_loss)
        if self.model.training and self.state.step in steps:
            batch = {**batch, "pixel_values": torch.full_like(batch["pixel_values"], math.nan)}
        return batch
    return model_inputs


def test_non_finite_steps_are_skipped_counted_and_stop_after_too_many(backbones, tmp_path, monkeypatch):
    clean = train(tiny_config(backbones, tmp_path / "clean"))
    assert clean["nonfinite_steps"] == 0
    monkeypatch.setattr(Trainer, "model_inputs", _poison({1, 4}))
    results = train(tiny_config(backbones, tmp_path / "poisoned"))
    assert results["nonfinite_steps"] == 2 and results["steps"] == 6
    weights = adapter_weights(tmp_path / "poisoned" / "adapter")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(v, adapter_weights(tmp_path / "clean" / "adapter")[k]) for k, v in weights.items())
    monkeypatch.setattr(Trainer, "model_inputs", _poison({1, 2, 3}))
    with pytest.raises(NonFiniteLossError, match="3 steps in a row .*--max_nonfinite_in_a_row"):
        train(tiny_config(backbones, tmp_path / "diverged", max_nonfinite_in_a_row=3))


def test_checkpoints_of_a_replaced_run_are_removed(backbones, finished_run, tmp_path):
    folder = copy_run(finished_run, tmp_path)
    checkpoints = folder / "checkpoints"
    os.replace(checkpoints / "step_6", checkpoints / "step_9")  # as if an abandoned run had gone further
    resume(backbones, folder, str(checkpoints / "step_3"))
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_3", "step_6"]
