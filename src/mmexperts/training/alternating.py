"""Direction schedules for multi-directional adapters: strictly alternating (one direction per optimiser step, as
Alt-MoE's AGD) or joint (every direction's loss summed each step).

A model takes part when one of its modules (the tuner) offers ``directions`` (their names), ``direction(name)``, a
context manager selecting what forward calls compute, and ``direction_parameters(name)``, the parameters only that
direction uses. The direction is a pure function of the optimiser step, so resumed runs continue the same sequence.
A direction schedule finds the tuner of a model and the parameters private to each direction once, not on every step.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from torch import nn

from ..altmoe.config import DIRECTION_SCHEDULES


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
        if mode not in DIRECTION_SCHEDULES:
            raise ValueError(f"The direction schedule must be one of {DIRECTION_SCHEDULES}, got {mode!r}.")
        if len(directions) < 1:
            raise ValueError("A direction schedule needs at least one direction.")
        self.directions, self.mode = tuple(directions), mode
        self._model: nn.Module | None = None
        self._tuner: nn.Module | None = None
        self._inactive: dict[str, list[nn.Parameter]] = {}

    @classmethod
    def for_model(cls, model: nn.Module, mode: str | None = None) -> DirectionSchedule | None:
        """The direction schedule a model's adapter asks for (its config's ``direction_schedule``), or None for
        one-way adapters."""
        tuner = directional_tuner(model)
        if tuner is None:
            return None
        config = tuner.peft_config[tuner.active_adapters[0]]
        schedule = cls(tuple(tuner.directions), mode or config.direction_schedule)
        schedule._model, schedule._tuner = model, tuner
        return schedule

    def tuner(self, model: nn.Module) -> nn.Module:
        """The module of ``model`` that selects directions, found on the first call for that model."""
        if model is not self._model:
            tuner = directional_tuner(model)
            if tuner is None:
                raise ValueError(f"{type(model).__name__} has no module selecting directions (a `direction(name)` "
                                 "context manager and `direction_parameters(name)`); use a multi-directional adapter.")
            self._model, self._tuner, self._inactive = model, tuner, {}
        return self._tuner

    def direction_at(self, step: int) -> str | None:
        """The direction optimiser step ``step`` trains; None means all of them."""
        if self.mode == "joint":
            return None
        return self.directions[step % len(self.directions)]

    @contextmanager
    def step(self, model: nn.Module, step: int):
        """Forward and backward of optimiser step ``step`` run inside this block."""
        with self.tuner(model).direction(self.direction_at(step)):
            yield

    def inactive_parameters(self, model: nn.Module, active: str) -> list[nn.Parameter]:
        """Parameters private to the directions other than ``active`` (computed once per model and direction)."""
        tuner = self.tuner(model)
        if active not in self._inactive:
            keep = {id(p) for p in tuner.direction_parameters(active)}
            self._inactive[active] = [param for direction in self.directions if direction != active
                                      for param in tuner.direction_parameters(direction) if id(param) not in keep]
        return self._inactive[active]

    def release_inactive(self, model: nn.Module, step: int) -> None:
        """After backward: drop the gradients of parameters private to directions that step ``step`` does not train."""
        active = self.direction_at(step)
        if active is None:
            return
        for param in self.inactive_parameters(model, active):
            param.grad = None


def direction_step(direction_schedule: DirectionSchedule | None, model: nn.Module, step: int):
    """``direction_schedule.step(model, step)``, or a no-op context for models without directions."""
    return nullcontext() if direction_schedule is None else direction_schedule.step(model, step)
