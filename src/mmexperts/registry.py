"""Registration of mmexperts' PEFT types into PEFT's own mappings.

PEFT's ``register_peft_method`` only accepts members of its closed ``PeftType`` enum, so third-party methods write the
same three mappings it writes, after the same checks. Registration is idempotent: importing twice is harmless.
"""

from __future__ import annotations

import enum

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING


class MMExpertsPeftType(str, enum.Enum):
    """PEFT types of the mmexperts methods; a ``str`` enum so ``adapter_config.json`` holds the plain name."""

    MOPE = "MOPE"
    S3 = "S3"
    ALTMOE = "ALTMOE"

    def __str__(self) -> str:  # get_model_status() reports str(peft_type).partition(".")[-1]
        return f"MMExpertsPeftType.{self.value}"


def register_method(peft_type: MMExpertsPeftType, config_cls: type, model_cls: type, prefix: str) -> None:
    """Register one method with PEFT, mirroring ``peft.utils.register_peft_method``'s checks.

    Re-registering the very same classes is a no-op; a different class under a taken type or prefix raises.
    """
    if not isinstance(peft_type, MMExpertsPeftType):
        raise TypeError(f"peft_type must be an MMExpertsPeftType member, got {peft_type!r}.")
    if prefix != prefix.lower() or not prefix.endswith("_"):
        raise ValueError(f"Prefix {prefix!r} must be lower case and end with '_', e.g. 'mope_'.")
    model_prefix = getattr(model_cls, "prefix", None)
    if model_prefix is not None and model_prefix != prefix:
        raise ValueError(
            f"{model_cls.__name__}.prefix is {model_prefix!r} but {peft_type.value} registers prefix {prefix!r}; "
            "they must be equal."
        )
    registered = (
        PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type),
        PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type),
        PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type),
    )
    if registered == (config_cls, model_cls, prefix):
        return
    if any(entry is not None for entry in registered):
        raise KeyError(
            f"PEFT type {peft_type.value} is already registered with {registered}; refusing to overwrite it with "
            f"({config_cls.__name__}, {model_cls.__name__}, {prefix!r})."
        )
    for other_type, other_prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_prefix == prefix:
            raise KeyError(f"Prefix {prefix!r} is already used by PEFT type {other_type}; choose another prefix.")
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
