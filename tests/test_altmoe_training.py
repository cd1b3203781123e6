"""Alt-MoE training: the direction schedule, the retrieval recipe end to end, and two processes under Accelerate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmexperts.training import train
from mmexperts.training.alternating import DirectionSchedule

from conftest import make_altmoe as make
from conftest import make_batch, tiny_config, train_on_two_cpu_processes

RETRIEVAL = dict(method="altmoe", dataset="synthetic:retrieval",
                 method_config={"num_experts": 4, "top_k": 2, "hidden_size": 16, "init_weights": False})


def test_alternating_schedule_strictly_alternates_and_resumes_by_step():
    schedule = DirectionSchedule(("vision_to_text", "text_to_vision"))
    assert [schedule.direction_at(s) for s in range(5)] == ["vision_to_text", "text_to_vision"] * 2 + ["vision_to_text"]
    assert DirectionSchedule(("vision_to_text", "text_to_vision"), "joint").direction_at(7) is None
    with pytest.raises(ValueError, match="direction schedule must be one of .*'alternating', 'joint'.*got 'random'"):
        DirectionSchedule(("vision_to_text",), "random")


def test_each_step_trains_one_direction_and_joint_sums_both():
    model = make("clip").train()
    schedule = DirectionSchedule.for_model(model)
    assert schedule.mode == "alternating" and schedule.directions == ("vision_to_text", "text_to_vision")
    tuner, batch = model.base_model, {**make_batch(with_labels=False), "return_loss": True}
    for step, active in ((0, "vision_to_text"), (1, "text_to_vision")):
        model.zero_grad(set_to_none=True)
        with schedule.step(model, step):
            out = model(**batch)
            out.loss.backward()
        schedule.release_inactive(model, step)
        other = "text_to_vision" if active == "vision_to_text" else "vision_to_text"
        assert out.get(active) is not None and out.get(other) is None and out.image_embeds is None
        assert all(p.grad is not None for p in tuner.direction_parameters(active))
        assert all(p.grad is None for p in tuner.direction_parameters(other))
        assert tuner.connector().experts.w1.grad is not None  # the shared experts learn on every step
    assert tuner.active_direction is None  # the context restored "both"
    with torch.no_grad():
        losses = {}
        for direction in ("vision_to_text", "text_to_vision", None):
            with tuner.direction(direction):
                losses[direction] = model.eval()(**batch).loss
    torch.testing.assert_close(losses[None], losses["vision_to_text"] + losses["text_to_vision"])


def test_retrieval_recipe_trains_and_reports_recall(backbones, tmp_path, capsys):
    results = train(tiny_config(backbones, tmp_path, **RETRIEVAL))
    expected = {f"eval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"eval_rsum"}
    assert expected <= set(results) and results["steps"] == 6
    assert all(0 <= results[key] <= 100 for key in expected - {"eval_rsum"})
    assert results["eval_rsum"] == pytest.approx(sum(results[k] for k in expected - {"eval_rsum"}))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ALTMOE"
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "eval_rsum" in card
    for plot in ("recall.png", "expert_usage.png"):  # Recall@K per direction, expert usage per direction
        assert (tmp_path / "adapter" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in card
    assert "README.md), recall.png, expert_usage.png" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI's mpirun is not installed (.ci/run installs it)")
@pytest.mark.slow
def test_two_cpu_processes_train_identical_connectors(backbones, tmp_path):
    initial, final = train_on_two_cpu_processes(
        tmp_path, *backbones, "--method", "altmoe", "--dataset", "synthetic:retrieval",
        "--method_config", json.dumps(RETRIEVAL["method_config"]))
    changed = {key for key in initial if not torch.equal(initial[key], final[key])}
    assert any("input_projections.vision_to_text" in key for key in changed)
    assert any("input_projections.text_to_vision" in key for key in changed)
    assert "eval_rsum" in json.loads((tmp_path / "run" / "metrics.json").read_text())
