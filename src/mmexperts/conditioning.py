"""Cross-modal conditioning plumbing: run one tower before the other without running it twice."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .towers import Tower


def gather_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The keyword view of a forward call, positional arguments bound to the model's forward signature."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    extra = {}
    for name, value in list(bound.items()):
        if inspect.signature(model.forward).parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            extra = bound.pop(name)
    return {**bound, **extra}


@contextmanager
def complementary_first(prompted: Tower, complementary: Tower, inputs: dict,
                        receive: Callable[[torch.Tensor], None]):
    """Deliver the complementary tower's pooled feature to ``receive`` before the prompted tower runs.

    If the model would run the prompted tower first, the complementary tower is run ahead of it with the call's own
    inputs, and the model's later call of that tower gets the very same output back instead of a second pass.
    """
    seen = {"done": False}
    tower = complementary.module

    def capture(module, args, output):
        seen["done"] = True
        receive(complementary.pool(output))

    def run_ahead(module, args):
        if seen["done"]:
            return
        tower_inputs = complementary.select_inputs(inputs)
        if not tower_inputs:
            raise ValueError(
                f"The {prompted.modality} tower is conditioned on the {complementary.modality} tower, but the call "
                f"has none of its inputs {list(complementary.input_names)}; pass both modalities."
            )
        output = tower(**tower_inputs)

        def replay(*_args, **_kwargs):
            del tower.forward  # back to the class's forward for any further call
            return output

        tower.forward = replay

    handles = [tower.register_forward_hook(capture), prompted.module.register_forward_pre_hook(run_ahead)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        tower.__dict__.pop("forward", None)
