"""The training recipe end to end on tiny local backbones: metrics, exact resume, publishing, multi-process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file

from mmexperts import VisionTextModelForClassification
from mmexperts.errors import CheckpointError
from mmexperts.training import TrainConfig, Trainer, list_checkpoints, parse_config, train

from conftest import ROOT, adapter_weights, launch_env, tiny_config, train_interrupted, train_on_two_cpu_processes


def test_recipe_trains_evaluates_and_writes_everything(backbones, tmp_path, capsys):
    results = train(tiny_config(backbones, tmp_path, unimodal_baselines=True))
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["steps"] == 6
    assert {"vision_only_accuracy", "text_only_accuracy"} <= set(results)
    assert json.loads((tmp_path / "metrics.json").read_text()) == results
    for folder in ("adapter", "best"):
        assert (tmp_path / folder / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter" / "routing.png").stat().st_size > 1000
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "eval_accuracy" in card
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_3", "step_6"]
    assert "| eval_accuracy |" in capsys.readouterr().out
    checkpoint = load_file(tmp_path / "checkpoints" / "step_6" / "model.safetensors")
    assert checkpoint and all("mope_" in key or "classifier" in key for key in checkpoint)


@pytest.mark.parametrize("accumulation", [1, 3])  # 3: an epoch of 8 micro-batches is 3 steps (3 + 3 + 2)
def test_interrupted_run_resumes_to_the_same_weights(backbones, tmp_path, monkeypatch, accumulation):
    train(tiny_config(backbones, tmp_path / "straight", gradient_accumulation_steps=accumulation))
    train_interrupted(tiny_config(backbones, tmp_path / "resumed", gradient_accumulation_steps=accumulation),
                      monkeypatch)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["step_3"]
    train(tiny_config(backbones, tmp_path / "resumed", resume_from_checkpoint="latest",
                      gradient_accumulation_steps=accumulation))

    straight = adapter_weights(tmp_path / "straight" / "adapter")
    resumed = adapter_weights(tmp_path / "resumed" / "adapter")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def test_resume_without_checkpoint_is_a_clear_error(backbones, tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(tiny_config(backbones, tmp_path, resume_from_checkpoint="latest"))


def test_push_to_hub_then_load_by_repo_id_offline(backbones, tmp_path, fake_hub):
    train(tiny_config(backbones, tmp_path, push_to_hub=True, hub_model_id="someone/mope-recipe"))
    (upload,) = fake_hub.uploads
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "routing.png"} <= set(upload["files"])
    assert b"library_name: peft" in upload["files"]["README.md"]

    vision, text = backbones
    local = peft.PeftModel.from_pretrained(_base(vision, text), tmp_path / "adapter").eval()
    hub = peft.PeftModel.from_pretrained(_base(vision, text), "someone/mope-recipe").eval()
    batch = {"pixel_values": torch.randn(3, 3, 32, 32), "input_ids": torch.randint(5, 40, (3, 6)),
             "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3])}
    torch.testing.assert_close(hub(**batch).logits, local(**batch).logits, rtol=0, atol=0)


def _base(vision: str, text: str) -> VisionTextModelForClassification:
    return VisionTextModelForClassification.from_vision_text_pretrained(
        vision, text, num_labels=2, classifier_input="vision")


def test_config_file_and_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: mope\nmethod_config: {num_experts: 8}\nmax_steps: 7\nbatch_size: 4\n")
    config = parse_config(["--config", str(path), "--batch_size", "16"])
    assert config.method_kwargs == {"num_experts": 8} and config.max_steps == 7 and config.batch_size == 16
    path.write_text("dataset_config: {hypotheses: [shape]}\n")
    assert parse_config(["--config", str(path)]).dataset_kwargs == {"hypotheses": ["shape"]}
    assert parse_config(["--dataset_config", "{max_objects: 2}"]).dataset_kwargs == {"max_objects": 2}
    with pytest.raises(ValueError, match="dataset_config must be a mapping"):
        TrainConfig(dataset_config="[colour]")
    with pytest.raises(ValueError, match=r"dataset_config sets \['seed'\].*--seed"):
        TrainConfig(dataset_config="{seed: 3, hypotheses: [colour]}")
    path.write_text("max_step: 7\n")
    with pytest.raises(ValueError, match="unknown fields \\['max_step'\\]"):
        parse_config(["--config", str(path)])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="Unknown method 'lora'"):
        TrainConfig(method="lora")


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI's mpirun is not installed (.ci/run installs it)")
@pytest.mark.slow
def test_two_cpu_processes_through_accelerate_launch_train_identical_adapters(backbones, tmp_path):
    initial, final = train_on_two_cpu_processes(tmp_path, *backbones, "--method_config", "{init_weights: false}")
    assert any(not torch.equal(initial[key], final[key]) for key in initial)
    assert "eval_accuracy" in json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.slow
def test_recipe_refuses_processes_that_did_not_form_a_group(backbones, tmp_path):
    """`accelerate launch --multi_gpu` on a machine without GPUs starts processes that never join one group."""
    vision, text = backbones
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "recipes" / "train.py"), "--vision_model", vision, "--text_model", text,
               "--output_dir", str(tmp_path), "--max_steps", "2", "--train_size", "64", "--eval_size", "32"]
    run = subprocess.run(command, env=dict(launch_env(), CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert "did not form one process group" in run.stdout + run.stderr
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("frozen_dropout", [True, False])
def test_frozen_towers_dropout_policy(backbones, tmp_path, frozen_dropout):
    trainer = Trainer(tiny_config(backbones, tmp_path, frozen_dropout=frozen_dropout))
    trainer.setup()
    trainer.train_mode()
    model = trainer.accelerator.unwrap_model(trainer.model)
    frozen = [m for m in model.modules() if list(m.parameters()) and not any(p.requires_grad for p in m.parameters())]
    trained = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    assert frozen and trained and all(m.training for m in trained)
    assert all(m.training == frozen_dropout for m in frozen)
