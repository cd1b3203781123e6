"""The adapter methods the recipe can train, by name."""

from __future__ import annotations

from peft import PeftConfig

from ..altmoe import AltMoEConfig
from ..mope import MoPEConfig
from ..s3 import S3Config

METHODS: dict[str, type[PeftConfig]] = {"mope": MoPEConfig, "altmoe": AltMoEConfig, "s3": S3Config}
RETRIEVAL_METHODS = {"altmoe"}  # methods that align two towers, trained on retrieval tasks
CACHED_FEATURE_METHODS = {"altmoe"}  # methods whose adapter reads only the frozen towers' outputs
UNUSED_PARAMETER_METHODS = {"altmoe"}  # a step may leave parameters unused (one direction, unrouted experts)


def method_config(name: str, kwargs: dict) -> PeftConfig:
    """Build the named method's PEFT config, with a clear error for unknown methods or fields."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; available: {sorted(METHODS)}.")
    try:
        return METHODS[name](**kwargs)
    except TypeError as error:
        raise ValueError(f"Bad method_config for {name!r}: {error}.") from error


def default_classifier_input(config: PeftConfig) -> str:
    """The head's input a method's paper uses: MoPE predicts from its prompted tower."""
    return getattr(config, "prompted_tower", "concat")
