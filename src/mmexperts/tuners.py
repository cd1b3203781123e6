"""What every mmexperts tuner shares: the model's towers (found once), the tower widths its config records, and the
config fields PEFT needs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from pathlib import Path

from peft import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .errors import ConfigError, CorruptFileError
from .towers import Tower, find_towers

MODALITIES = ("vision", "text")
MAX_ADAPTER_PARAMETERS = 2**30  # 4 GiB in float32: far above any adapter of these methods on real backbones


@dataclass
class TowerAdapterConfig(PeftConfig):
    """Fields every mmexperts adapter config shares: PEFT's module selectors (filled at injection from the towers) and
    the towers' widths, recorded at injection and checked when the adapter is loaded onto a model."""

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Filled automatically from the towers found by find_towers (see the method's docs)."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to leave untouched."})
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Unused; required by PEFT."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Extra trainable modules (a classifier head is added automatically where the method trains it)."})
    vision_hidden_size: int | None = field(default=None, metadata={"help": "Recorded at injection; checked on load."})
    text_hidden_size: int | None = field(default=None, metadata={"help": "Recorded at injection; checked on load."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        for spec in fields(self):  # every number field holds a real, finite number of its declared kind
            value, kind = getattr(self, spec.name), str(spec.type)
            if value is None or kind.startswith("list") or kind.startswith("bool"):
                continue
            if kind.startswith("int") and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(spec.name, f"{spec.name} must be an integer, got {value!r}.")
            if kind.startswith("float") and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                             or not math.isfinite(value)):
                raise ConfigError(spec.name, f"{spec.name} must be a finite number, got {value!r}.")
        for name in ("vision_hidden_size", "text_hidden_size"):
            self.check_int(name, 1, optional=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's loading, plus a check that a local adapter folder's weights file is readable, so a damaged file
        is named before PEFT tries to load it."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        weights = folder / SAFETENSORS_WEIGHTS_NAME
        if weights.is_file():
            try:
                with safe_open(str(weights), "pt") as f:
                    list(f.keys())
            except Exception as error:  # safetensors reports damage with its own error types
                raise CorruptFileError(weights, f"cannot be read as safetensors ({error}). The file is damaged or "
                                       "incomplete: copy or download the adapter again, or re-save it.") from None
        return config

    def check_int(self, name: str, minimum: int, maximum: int | None = None, optional: bool = False) -> None:
        """Refuse a field that is not an integer in ``[minimum, maximum]`` (or None when ``optional``)."""
        value = getattr(self, name)
        if optional and value is None:
            return
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum and (
                maximum is None or value <= maximum):
            return
        if maximum is not None:
            expected = f"an integer between {minimum} and {maximum}"
        else:
            expected = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ConfigError(name, f"{name} must be {expected}{' or None' if optional else ''}, got {value!r}.")

    def check_float(self, name: str, low: float, high: float | None = None, *, low_open: bool = False,
                    high_open: bool = False) -> None:
        """Refuse a field outside ``low`` .. ``high`` (open ends where asked); NaN and inf never pass."""
        value = getattr(self, name)
        inside = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and inside:
            return
        if high is None:
            expected = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            expected = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(name, f"{name} must be {expected}, got {value!r}.")

    def check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        """Refuse a field that is not one of ``choices``."""
        if getattr(self, name) not in choices:
            raise ConfigError(name, f"{name} must be one of {choices}, got {getattr(self, name)!r}.")


class TwoTowerTuner(BaseTuner):
    """A PEFT tuner over a two-tower model; subclasses set ``method_name`` and, if they keep per-call records,
    ``forward_state_cls``."""

    method_name: str = "mmexperts"
    forward_state_cls: type | None = None

    @property
    def towers(self) -> dict[str, Tower]:
        """The model's vision and text towers (found once, before injection)."""
        if "_towers" not in self.__dict__:
            self.__dict__["_towers"] = find_towers(self.model)
        return self.__dict__["_towers"]

    @property
    def forward_state(self):
        """Records of the latest forward call, shared by the tuner and its layers."""
        if "_forward_state" not in self.__dict__:
            self.__dict__["_forward_state"] = self.forward_state_cls()
        return self.__dict__["_forward_state"]

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put the wrapper in place of the block, with its adapter modules on the block's device."""
        setattr(parent, child_name, new_module)
        parameter = next(child.parameters(), None)
        if parameter is None or parameter.device.type == "meta":
            return
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(parameter.device)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if self.prefix not in name:
                param.requires_grad = False

    def _record_tower_sizes(self, peft_config) -> None:
        """Store the towers' hidden sizes in the config, or refuse a config recorded for other widths."""
        for modality in MODALITIES:
            recorded, actual = getattr(peft_config, f"{modality}_hidden_size"), self.towers[modality].hidden_size
            if recorded is not None and recorded != actual:
                raise ValueError(
                    f"This {self.method_name} adapter was built for a {modality} tower of hidden size {recorded}, but "
                    f"the model's {modality} tower has hidden size {actual}. Load it onto the backbone it was "
                    "trained with."
                )
            setattr(peft_config, f"{modality}_hidden_size", actual)
        count = self.estimated_parameters(peft_config)
        if count > MAX_ADAPTER_PARAMETERS:
            raise ConfigError(
                self.size_fields[0], f"This {self.method_name} config would create about {count:,} adapter parameters "
                f"({count * 4 / 2**30:.1f} GiB in float32), above the limit of {MAX_ADAPTER_PARAMETERS:,}; lower "
                f"{', '.join(self.size_fields)}."
            )

    size_fields: tuple[str, ...] = ("num_experts",)

    def estimated_parameters(self, peft_config) -> int:
        """About how many parameters the adapter adds to this model (checked before anything is allocated)."""
        raise NotImplementedError


class UnmergeableLayer:
    """Mixin for mmexperts tuner layers: their output depends on each input, so it cannot be folded into the frozen
    weights. ``merge`` and ``unmerge`` raise a clear error; ``unload`` returns the frozen block (after ``_detach``)."""

    method_name: str = "mmexperts"
    merge_reason: str = "this adapter depends on each input"

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError(f"{self.merge_reason} and cannot be merged into the frozen weights; keep the "
                                  "adapter attached or call `unload()`.")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{self.method_name} adapters are never merged, so there is nothing to unmerge.")

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        if merge:
            self.merge(safe_merge, adapter_names)
        self._detach()
        return self.base_layer

    def _detach(self) -> None:
        """Remove whatever the layer attached to its block besides wrapping it (hooks)."""
