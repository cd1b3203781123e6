"""Direction schedules for multi-directional adapters: strictly alternating (one direction per optimiser step, as
Alt-MoE's AGD) or joint (every direction's loss summed each step).

A model takes part when one of its modules (the tuner) offers ``directions`` (their names), ``direction(name)``, a
context manager selecting what forward calls compute, and ``direction_parameters(name)``, the parameters only that
direction uses. The direction is
a pure function of the optimiser step, so resumed runs continue the same sequence.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from torch import nn

SCHEDULE_MODES = ("alternating", "joint")


def directional_tuner(model: nn.Module) -> nn.Module | None:
    """The module of ``model`` (a PeftModel, possibly wrapped by DDP/Accelerate) that selects directions, if any."""
    for module in model.modules():
        if callable(getattr(module, "direction", None)) and callable(getattr(module, "direction_parameters", None)):
            return module
    return None


class DirectionSchedule:
    """Which direction each optimiser step trains.

    ``"alternating"``: step ``s`` trains ``directions[s % len(directions)]`` only; parameters private to the other
    directions get no update on that step (their gradients are dropped, so optimisers skip them).
    ``"joint"``: every step trains all directions at once (the summed loss).
    """

    def __init__(self, directions: tuple[str, ...] | list[str], mode: str = "alternating"):
        if mode not in SCHEDULE_MODES:
            raise ValueError(f"schedule mode must be one of {SCHEDULE_MODES}, got {mode!r}.")
        if len(directions) < 1:
            raise ValueError("A direction schedule needs at least one direction.")
        self.directions, self.mode = tuple(directions), mode

    @classmethod
    def for_model(cls, model: nn.Module, mode: str | None = None) -> DirectionSchedule | None:
        """The schedule a model's adapter asks for (its config's ``schedule``), or None for one-way adapters."""
        tuner = directional_tuner(model)
        if tuner is None:
            return None
        config = tuner.peft_config[tuner.active_adapters[0]]
        return cls(tuple(tuner.directions), mode or config.schedule)

    def direction_at(self, step: int) -> str | None:
        """The direction optimiser step ``step`` trains; None means all of them."""
        if self.mode == "joint":
            return None
        return self.directions[step % len(self.directions)]

    @contextmanager
    def step(self, model: nn.Module, step: int):
        """Forward and backward of optimiser step ``step`` run inside this block."""
        tuner = directional_tuner(model)
        if tuner is None:
            raise ValueError(f"{type(model).__name__} has no module selecting directions (a `direction(name)` "
                             "context manager and `direction_parameters(name)`); use a multi-directional adapter.")
        with tuner.direction(self.direction_at(step)):
            yield

    def release_inactive(self, model: nn.Module, step: int) -> None:
        """After backward: drop the gradients of parameters private to directions that step ``step`` does not train."""
        active = self.direction_at(step)
        if active is None:
            return
        tuner = directional_tuner(model)
        keep = {id(p) for p in tuner.direction_parameters(active)}
        for direction in self.directions:
            if direction != active:
                for param in tuner.direction_parameters(direction):
                    if id(param) not in keep:
                        param.grad = None


def schedule_step(schedule: DirectionSchedule | None, model: nn.Module, step: int):
    """``schedule.step(model, step)``, or a no-op context for models without directions."""
    return nullcontext() if schedule is None else schedule.step(model, step)
