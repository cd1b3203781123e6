"""The training engine: accumulation, clipping, non-finite steps, the direction schedule, hooks resolved once."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from mmexperts.errors import MMExpertsError, NonFiniteLossError
from mmexperts.training import alternating, engine, probes
from mmexperts.training.engine import Engine, adamw_with_lr_scheduler, lr_factor, without
from mmexperts.training.evaluation import evaluate_labels
from mmexperts.training.methods import labelled_inputs, method_hooks, retrieval_inputs

from conftest import make_altmoe as make
from conftest import make_batch


class Regression(nn.Module):
    """A linear model whose output carries the mean squared error as ``loss``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return nn.functional.mse_loss(self.linear(x), y)


class WithLoss(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return type("Output", (), {"loss": self.model(**batch)})()


def batches(count: int, rows: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(rows, 4, generator=generator), "y": torch.randn(rows, 2, generator=generator)}
            for _ in range(count)]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_accumulating_k_micro_batches_is_one_step_on_the_k_times_batch():
    k, parts = 3, batches(3)
    whole = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    results = []
    for steps, data in ((k, parts), (1, [whole])):
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
        model = WithLoss(Regression())
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))  # scale-aware
        trainer = Engine(model, optimizer, accelerator=accelerator)
        outputs = [trainer.micro_step(batch) for batch in data]
        assert [out is not None for out in outputs] == [False] * (steps - 1) + [True]
        assert trainer.state.step == 1
        results.append(weights(accelerator.unwrap_model(model)))
    assert any(not torch.equal(results[0][n], weights(WithLoss(Regression()))[n]) for n in results[0])
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def test_clipping_bounds_the_update():
    updates = {}
    for max_norm in (0.0, 0.01):
        model = WithLoss(Regression())
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        batch = {**batches(1)[0], "y": torch.full((4, 2), 100.0)}  # a gradient far above the norm
        Engine(model, torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=max_norm).run([batch])
        updates[max_norm] = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
    assert updates[0.0] > 1.0 and updates[0.01] == pytest.approx(0.01, rel=1e-4)


def test_a_non_finite_loss_skips_the_update_and_too_many_stop_training():
    model = WithLoss(Regression())
    optimizer, scheduler = adamw_with_lr_scheduler(model.parameters(), 0.1, steps=10, warmup=0)
    trainer = Engine(model, optimizer, scheduler, max_nonfinite_in_a_row=2)
    poisoned = {**batches(1)[0], "x": torch.full((4, 4), math.nan)}
    before = weights(model)
    out = trainer.run([poisoned])
    assert not out.finite and math.isnan(out.loss) and out.step == 1
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert scheduler.last_epoch == 1 and trainer.state.nonfinite_steps == 1  # the step still counts
    out = trainer.run(batches(1))
    assert out.finite and trainer.state.nonfinite_in_a_row == 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        trainer.run([poisoned, poisoned])
    assert trainer.state.nonfinite_steps == 3


def test_each_step_updates_only_the_active_directions_parameters():
    model = make("clip").train()
    tuner = model.base_model
    private = {d: {id(p) for p in tuner.direction_parameters(d)} for d in tuner.directions}
    names = {d: {n for n, p in model.named_parameters() if id(p) in private[d]} for d in private}
    trainer = Engine(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    assert trainer.direction_schedule.mode == "alternating" and trainer.hooks.model_inputs is retrieval_inputs
    batch = {**make_batch(with_labels=False), "image_ids": torch.arange(4)}  # the hook drops the ids
    for step, active in enumerate(("vision_to_text", "text_to_vision"), start=1):
        before = weights(model)
        trainer.run([batch], max_steps=step)
        changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        other = next(d for d in private if d != active)
        assert names[active] <= changed and not names[other] & changed
        assert any("experts" in n for n in changed)  # the shared experts learn on every step
    assert tuner.active_direction is None


def test_hooks_and_the_direction_schedule_are_resolved_once_per_run(monkeypatch):
    calls = {"hooks": 0, "tuner": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(engine, "method_hooks", counted("hooks", method_hooks))
    monkeypatch.setattr(alternating, "directional_tuner", counted("tuner", alternating.directional_tuner))
    model = make("clip").train()
    trainer = Engine(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    trainer.run([make_batch(with_labels=False)] * 4)
    assert trainer.state.step == 4 and calls == {"hooks": 1, "tuner": 1}


def test_plain_models_get_the_default_hooks_and_inputs_can_be_overridden():
    model = WithLoss(Regression())
    assert method_hooks(model).model_inputs is labelled_inputs and method_hooks(model).evaluate is evaluate_labels
    trainer = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), model_inputs=without("extra"))
    assert trainer.run([{**batches(1)[0], "extra": 1}]).finite
    silent = Engine(WithLoss(lambda **batch: None), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(MMExpertsError, match="WithLoss returned no loss for this batch: give it the inputs"):
        silent.run(batches(1))


def test_lr_factor_warms_up_linearly_then_decays_by_cosine_or_stays():
    cosine, constant = lr_factor(20, 4), lr_factor(20, 4, "constant")
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0] == [constant(s) for s in range(4)]
    assert cosine(4) < 1.0 and cosine(19) < 0.05 and all(cosine(s) > cosine(s + 1) for s in range(3, 19))
    assert {constant(s) for s in range(4, 40)} == {1.0}
    with pytest.raises(ValueError, match="decay must be one of"):
        lr_factor(10, 1, "linear")


def test_an_epoch_of_micro_batches_that_accumulation_does_not_divide_is_used_whole():
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from mmexperts.training.loop import data_position

    accelerator = Accelerator(gradient_accumulation_steps=3, cpu=True)
    model = torch.nn.Linear(2, 1)
    loader = accelerator.prepare(DataLoader(torch.randn(10, 2), batch_size=1))  # 10 micro-batches: 3 + 3 + 3 + 1
    syncs = []
    for batch in loader:
        with accelerator.accumulate(model):
            syncs.append(accelerator.sync_gradients)
    assert sum(syncs) == 4 and syncs[-1]  # Accelerate ends the accumulation with the data
    assert [data_position(step, 10, 3) for step in (0, 3, 4, 5, 8)] == [(0, 0), (0, 9), (1, 0), (1, 3), (2, 0)]
    assert data_position(7, 12, 3) == (1, 9)  # dividing evenly: 4 steps an epoch


@pytest.mark.parametrize("multi_label", [False, True], ids=["single_label", "multi_label"])
def test_linear_probes_train_through_the_engine_as_a_plain_adamw_loop_would(multi_label, monkeypatch):
    torch.manual_seed(0)
    x, eval_x = torch.randn(64, 8), torch.randn(16, 8)
    y = torch.randint(0, 2, (64, 3)) if multi_label else torch.randint(0, 3, (64,))
    runs, run = [], Engine.run
    monkeypatch.setattr(probes.Engine, "run", lambda self, *a, **k: runs.append(self) or run(self, *a, **k))
    logits = probes.fit_linear_probe(x, y, eval_x, multi_label, 3, steps=20, seed=4)
    assert len(runs) == 1 and runs[0].state.step == 20

    generator = torch.Generator().manual_seed(4)  # the same probe, by hand
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    head = nn.Linear(8, 3)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=1e-3)
    loss_fn = nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()
    for _ in range(20):
        optimizer.zero_grad()
        loss_fn(head((x - mean) / std), y.float() if multi_label else y).backward()
        optimizer.step()
    with torch.no_grad():
        assert torch.equal(logits, head((eval_x - mean) / std))
