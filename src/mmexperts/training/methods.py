"""The adapter methods the recipe can train, by name, and what a training run does differently for each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peft import PeftConfig
from torch import nn

from ..altmoe import AltMoEConfig
from ..mope import MoPEConfig
from ..s3 import S3Config
from .evaluation import (
    Evaluation,
    evaluate_labels,
    evaluate_retrieval,
    expert_usage_plots,
    label_metric,
    retrieval_metric,
    retrieval_plots,
    routing_plots,
)


def labelled_inputs(batch: dict, return_loss: bool = True) -> dict:
    """The model's keyword arguments for a labelled batch: the batch itself."""
    return batch


def retrieval_inputs(batch: dict, return_loss: bool = True) -> dict:
    """The model's keyword arguments for a retrieval batch: its image ids dropped, the loss asked for."""
    return {**{k: v for k, v in batch.items() if k != "image_ids"}, "return_loss": return_loss}


@dataclass(frozen=True)
class MethodHooks:
    """What a training run does differently for a method, resolved once per run (``method_hooks``).

    ``model_inputs(batch, return_loss=True)``: the model's keyword arguments for a collated batch.
    ``evaluate(model, loader, accelerator, model_inputs, multi_label)``: an ``Evaluation`` of the model in eval mode
    (``evaluate_labels``: logits against labels; ``evaluate_retrieval``: Recall@K both ways).
    ``main_metric(multi_label)``: the metric the best adapter is kept by.
    ``plots(model, evaluation, target)``: the final evaluation's figures, ``{file name: path}``.
    """

    model_inputs: Callable[..., dict] = labelled_inputs
    evaluate: Callable[..., Evaluation] = evaluate_labels
    main_metric: Callable[[bool], str] = label_metric
    plots: Callable[..., dict] = routing_plots

    @property
    def retrieval(self) -> bool:
        """Whether the method trains on retrieval pairs (no labels)."""
        return self.evaluate is evaluate_retrieval


METHODS: dict[str, type[PeftConfig]] = {"mope": MoPEConfig, "altmoe": AltMoEConfig, "s3": S3Config}
METHOD_HOOKS: dict[str, MethodHooks] = {
    "mope": MethodHooks(),
    "s3": MethodHooks(plots=expert_usage_plots),
    "altmoe": MethodHooks(retrieval_inputs, evaluate_retrieval, retrieval_metric, retrieval_plots),
}
RETRIEVAL_METHODS = {name for name, hooks in METHOD_HOOKS.items() if hooks.retrieval}
# methods whose adapter can train from the frozen towers' stored outputs (S3: on labelled image-text tasks, with its
# own heads), and those of them that do by default (Alt-MoE reads only the towers' outputs)
CACHED_FEATURE_METHODS = {"altmoe", "s3"}
DEFAULT_CACHED_FEATURE_METHODS = {"altmoe"}
UNUSED_PARAMETER_METHODS = {"altmoe"}  # a step may leave parameters unused (one direction, unrouted experts)


def method_config(name: str, kwargs: dict) -> PeftConfig:
    """Build the named method's PEFT config, with a clear error for unknown methods or fields."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; available: {sorted(METHODS)}.")
    config_class = METHODS[name]
    try:
        return config_class(**config_class.with_current_names(kwargs, f"method_config of {name!r}"))
    except TypeError as error:
        raise ValueError(f"Bad method_config for {name!r}: {error}.") from error


def default_classifier_input(config: PeftConfig) -> str:
    """The head's input a method's paper uses: MoPE predicts from its prompted tower."""
    return getattr(config, "prompted_tower", "concat")


def method_of(model: nn.Module) -> str | None:
    """The method (a ``METHODS`` name) of the active adapter of ``model``, a PeftModel or a module forwarding
    ``base_model`` to one (``FeatureConnector``), read from its tuner; None for other models."""
    tuner = getattr(model, "base_model", None)
    configs = getattr(tuner, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    active = getattr(tuner, "active_adapters", None) or list(configs)
    config = configs.get(active[0])
    return next((name for name, config_class in METHODS.items() if isinstance(config, config_class)), None)


def method_hooks(model: nn.Module) -> MethodHooks:
    """The ``MethodHooks`` of the method of ``model`` (the defaults for plain models and unknown methods)."""
    return METHOD_HOOKS.get(method_of(model), MethodHooks())
