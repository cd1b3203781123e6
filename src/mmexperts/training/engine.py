"""The optimisation loop every training path of the library runs.

``Engine`` takes a model, an optimizer and an optional learning-rate scheduler and trains on any iterable of batches:
forward and backward under Accelerate's ``accumulate``, optional gradient clipping, the direction schedule of
multi-directional adapters (Alt-MoE), non-finite steps skipped and counted, a progress bar and per-step callbacks (the
Trainer logs, evaluates and checkpoints there). ``adamw_with_lr_scheduler`` builds AdamW and a learning-rate
scheduler (linear warm-up, then cosine or constant).

What differs between methods (the model's inputs; how a run is evaluated) comes from ``MethodHooks``, resolved once
per engine from the model's tuner (``training.methods.method_hooks``); the direction schedule is resolved once too.

Without an ``accelerator`` the engine runs in this process alone through ``LocalAccelerator``, which leaves
Accelerate's process-wide state alone (an ``Accelerator`` made inside another run would change that run's gradient
accumulation): one micro-batch per step, plain ``backward`` and ``clip_grad_norm_``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MMExpertsError, NonFiniteLossError
from .alternating import DirectionSchedule, direction_step
from .checkpoint import TrainingState
from .methods import MethodHooks, method_hooks

__all__ = ["AUTO", "DECAYS", "Engine", "LocalAccelerator", "StepOutput", "adamw_with_lr_scheduler", "lr_factor",
           "without"]

AUTO = "auto"  # resolve the direction schedule from the model
DECAYS = ("cosine", "constant")


@dataclass(frozen=True)
class StepOutput:
    """One optimiser step: ``step`` counts the steps done (this one included); ``loss`` is the mean loss of its
    micro-batches up to the first non-finite one (NaN if none); ``finite`` is False when the update was skipped."""

    step: int
    loss: float
    finite: bool


class LocalAccelerator:
    """The part of ``accelerate.Accelerator`` the engine uses, for one process: no gradient accumulation, no mixed
    precision, no process-wide state."""

    num_processes = 1
    sync_gradients = True
    gradient_accumulation_steps = 1

    def accumulate(self, *models: nn.Module):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        return nn.utils.clip_grad_norm_(parameters, max_norm)

    def unscale_gradients(self) -> None:
        pass

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def print(self, *args) -> None:
        print(*args)


def lr_factor(steps: int, warmup: int, decay: str = "cosine") -> Callable[[int], float]:
    """The learning-rate factor of step ``s`` (0-based): ``(s + 1) / warmup`` over the first ``warmup`` steps, then
    half a cosine period down to 0 at step ``steps`` (``"cosine"``) or 1 (``"constant"``)."""
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}.")
    if not 0 <= warmup <= steps:
        raise ValueError(f"warmup must be in [0, steps={steps}], got {warmup}.")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup + 1) / (steps - warmup + 1)))

    return factor


def adamw_with_lr_scheduler(parameters: Iterable[nn.Parameter], lr: float, steps: int, *, weight_decay: float = 0.01,
                            warmup: int | None = None, decay: str = "cosine"
                            ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its learning-rate scheduler (``lr_factor``) over ``steps`` optimiser steps; ``warmup`` defaults to a
    tenth of them (at least one)."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    warmup = max(steps // 10, 1) if warmup is None else warmup
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(steps, warmup, decay))


def without(*keys: str) -> Callable[..., dict]:
    """A ``model_inputs`` that drops ``keys`` from each batch (e.g. ``"labels"`` for a self-supervised stage)."""

    def model_inputs(batch: dict, return_loss: bool = True) -> dict:
        return {k: v for k, v in batch.items() if k not in keys}

    return model_inputs


class Engine:
    """Optimiser steps over micro-batches: ``Engine(model, optimizer, lr_scheduler).run(batches, max_steps)``.

    ``accelerator``: an ``accelerate.Accelerator`` (with the model, optimizer and lr_scheduler usually prepared by it),
    or None for ``LocalAccelerator``. ``max_grad_norm`` > 0 clips the gradients of the optimizer's parameters.
    ``direction_schedule``: a ``DirectionSchedule``, None, or ``AUTO`` (the model's own, if its adapter has directions).
    ``hooks``: the method's ``MethodHooks`` (default: resolved from the model); ``model_inputs`` overrides their
    ``model_inputs``. ``skip_nonfinite``: a step whose loss or gradient is not finite on some process updates nothing
    (the learning-rate scheduler still advances); after ``max_nonfinite_in_a_row`` such steps
    ``NonFiniteLossError`` is raised.
    ``state``: the progress (step and non-finite counts) to continue and update, e.g. a resumed run's.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler=None, *, accelerator=None,
                 max_grad_norm: float = 0.0, direction_schedule: DirectionSchedule | str | None = AUTO,
                 hooks: MethodHooks | None = None, model_inputs: Callable[..., dict] | None = None,
                 skip_nonfinite: bool = True, max_nonfinite_in_a_row: int | None = None,
                 state: TrainingState | None = None):
        self.accelerator = accelerator if accelerator is not None else LocalAccelerator()
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.max_grad_norm, self.skip_nonfinite = max_grad_norm, skip_nonfinite
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.hooks = hooks if hooks is not None else method_hooks(self.accelerator.unwrap_model(model))
        self.model_inputs = model_inputs if model_inputs is not None else self.hooks.model_inputs
        if isinstance(direction_schedule, str):
            if direction_schedule != AUTO:
                raise ValueError(f"direction_schedule must be a DirectionSchedule, None or {AUTO!r}, got "
                                 f"{direction_schedule!r}.")
            direction_schedule = DirectionSchedule.for_model(model)
        self.direction_schedule = direction_schedule
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.state = state if state is not None else TrainingState()
        self._running, self._seen, self._finite = 0.0, 0, True

    def micro_step(self, batch: dict) -> StepOutput | None:
        """Forward and backward of one micro-batch; on the last of a step, the update. Returns the step's output
        when an optimiser step ended, else None."""
        accelerator, state = self.accelerator, self.state
        finite = self._finite
        with accelerator.accumulate(self.model), direction_step(self.direction_schedule, self.model, state.step):
            loss = self.model(**self.model_inputs(batch)).loss
            if loss is None:
                raise MMExpertsError(f"{type(self.accelerator.unwrap_model(self.model)).__name__} returned no loss "
                                     "for this batch: give it the inputs its loss needs (labels), or switch on the "
                                     "loss it can compute without them.")
            if self.skip_nonfinite:
                finite = finite and bool(torch.isfinite(loss.detach()).all())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if self.direction_schedule is not None:
                    self.direction_schedule.release_inactive(self.model, state.step)
                if self.skip_nonfinite:
                    finite = self._all_finite(finite)
                    if not finite:  # no gradients, no update; the step still advances
                        self.optimizer.zero_grad()
                elif self.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)
                self.optimizer.step()
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
                self.optimizer.zero_grad()
        if finite:
            self._running, self._seen = self._running + loss.detach().float().item(), self._seen + 1
        self._finite = finite
        if not accelerator.sync_gradients:
            return None
        state.step += 1
        out = StepOutput(state.step, self._running / self._seen if self._seen else float("nan"), finite)
        self._running, self._seen, self._finite = 0.0, 0, True
        if self.skip_nonfinite:
            self._count_nonfinite(finite)
        return out

    def run(self, batches: Iterable[dict], max_steps: int | None = None, *, progress=None,
            callbacks: Iterable[Callable[[StepOutput], None]] = ()) -> StepOutput | None:
        """Train on ``batches`` until they run out or ``state.step`` reaches ``max_steps`` (no batch is drawn after
        that); ``progress`` (a tqdm bar) advances and each callback is called after every optimiser step. Returns the
        last step's output (None if no step ended)."""
        last = None
        if max_steps is not None and self.state.step >= max_steps:
            return last
        callbacks = tuple(callbacks)
        for batch in batches:
            out = self.micro_step(batch)
            if out is None:
                continue
            last = out
            if progress is not None:
                progress.update(1)
            for callback in callbacks:
                callback(out)
            if max_steps is not None and out.step >= max_steps:
                break
        return last

    def _all_finite(self, loss_finite: bool) -> bool:
        """Whether every process's loss and the synchronised gradients are finite (clipping, if set, happens here)."""
        accelerator = self.accelerator
        if self.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)  # unscales fp16 grads
        else:
            accelerator.unscale_gradients()  # fp16: the grad scaler records its inf checks here
            norms = [p.grad.detach().float().norm() for p in self.parameters if p.grad is not None]
            norm = torch.stack(norms).norm() if norms else None
        grads_finite = norm is None or bool(torch.isfinite(torch.as_tensor(norm)))  # None: no grads, or DeepSpeed
        if accelerator.num_processes == 1:
            return loss_finite and grads_finite
        flags = torch.tensor([float(loss_finite), float(grads_finite)], device=accelerator.device)
        return bool(accelerator.reduce(flags, reduction="sum").eq(accelerator.num_processes).all())

    def _count_nonfinite(self, finite: bool) -> None:
        """Count skipped steps; stop after ``max_nonfinite_in_a_row`` of them in a row."""
        state = self.state
        if finite:
            state.nonfinite_in_a_row = 0
            return
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
        self.accelerator.print(f"step {state.step}: non-finite loss or gradient, update skipped "
                               f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_steps} in all).")
        limit = self.max_nonfinite_in_a_row
        if limit is not None and state.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (up to step "
                f"{state.step}); training stopped. Check the inputs for NaN/inf, lower --learning_rate, or use "
                "--mixed_precision bf16 instead of fp16; --max_nonfinite_in_a_row sets the limit.")
