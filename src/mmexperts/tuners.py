"""What every mmexperts tuner shares: config fields and checks, the model's towers (found once), the per-call context
and output plumbing, checkpoint key mapping, and the unmergeable-layer behaviour."""

from __future__ import annotations

import math
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from torch import nn

from .conditioning import gather_inputs
from .context import CallContext
from .errors import ConfigError, CorruptFileError
from .renames import current_names
from .towers import Tower, find_towers, tower_options

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

    # earlier name -> current name of fields renamed since adapters were first saved; read back under the new name
    renamed_fields: ClassVar[dict[str, str]] = {}

    @classmethod
    def with_current_names(cls, kwargs: dict, where: str | None = None) -> dict:
        """``kwargs`` with fields saved under an earlier name (``renamed_fields``) moved to their current name."""
        return current_names(kwargs, cls.renamed_fields, where or cls.__name__)

    @classmethod
    def check_kwargs(cls, **kwargs):
        """PEFT's hook before a saved config is built: fields saved under an earlier name are read as the current
        one (PEFT would otherwise drop them and build the adapter with the defaults)."""
        return super().check_kwargs(**cls.with_current_names(kwargs, f"saved {cls.__name__}"))

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        for spec in fields(self):  # every number field holds a real, finite number of its declared kind
            value, kind = getattr(self, spec.name), str(spec.type)
            if not kind.startswith(("int", "float")):
                continue
            if value is None:
                if "None" not in kind:
                    raise ConfigError(spec.name, f"{spec.name} must be a number, got None.")
            elif kind.startswith("int") and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(spec.name, f"{spec.name} must be an integer, got {value!r}.")
            elif kind.startswith("float") and not _finite_number(value):
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
        if _finite_number(value) and (value > low if low_open else value >= low) and (
                high is None or (value < high if high_open else value <= high)):
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


def _finite_number(value) -> bool:
    """A real number (not a bool) that is finite as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


class TwoTowerTuner(BaseTuner):
    """A PEFT tuner over a two-tower model. Subclasses set ``method_name`` and implement ``call_outputs`` (what a call
    adds to the model's output) and, if a call needs more than recording, ``call_hooks``.

    Every forward call of the PeftModel opens the tuner's :class:`~mmexperts.context.CallContext` (shared with its
    layers), lets the model run, then attaches the adapter's outputs: ``aux_loss`` and ``routing_weights`` always
    (zeros or empty where the config has nothing to route), plus the method's own fields and loss.
    """

    method_name: str = "mmexperts"
    # earlier name -> current name of parts of weight keys renamed since adapters were first saved
    renamed_key_parts: dict[str, str] = {}

    @cached_property
    def towers(self) -> dict[str, Tower]:
        """The model's vision and text towers (found once, before injection)."""
        return find_towers(self.model)

    @cached_property
    def context(self) -> CallContext:
        """The per-call context shared by the tuner and its layers."""
        return CallContext()

    def tuner_layers(self) -> list[nn.Module]:
        """The method's layers in the model, in module order."""
        return [module for module in self.model.modules() if isinstance(module, self.tuner_layer_cls)]

    def active_adapter_names(self) -> list[str]:
        """The active adapters of this tuner that run in a call; none inside ``disable_adapter()``."""
        layers = self.tuner_layers()
        if not layers or layers[0].disable_adapters:
            return []
        return [name for name in self.active_adapters if name in self.peft_config]

    def single_adapter(self, adapter_name: str | None = None) -> str:
        """``adapter_name`` checked, or the one active adapter when it is None."""
        if adapter_name is None:
            active = self.active_adapter_names() or [n for n in self.active_adapters if n in self.peft_config]
            if len(active) != 1:
                raise ValueError(f"{len(active)} {self.method_name} adapters are active ({active}); pass adapter_name "
                                 "or activate exactly one with model.set_adapter(name).")
            return active[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"No {self.method_name} adapter named {adapter_name!r}; available: "
                             f"{sorted(self.peft_config)}.")
        return adapter_name

    @contextmanager
    def calling(self, inputs: dict):
        """Open the call context for one forward call (with ``inputs``, its keyword view) and clear it after."""
        self.context.open(inputs)
        try:
            yield self.context
        finally:
            self.context.clear()  # drop the call's activations and graph

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        names = self.active_adapter_names()
        inputs = gather_inputs(self.model, args, kwargs)
        if not names:
            with tower_options(self.towers, inputs):
                yield
            return
        with tower_options(self.towers, inputs), self.calling(inputs), self.call_hooks(inputs, names):
            handle = self.model.register_forward_hook(lambda module, args, output: self._attach_outputs(output, names))
            try:
                yield
            finally:
                handle.remove()

    def call_hooks(self, inputs: dict, adapter_names: list[str]):
        """Hooks a call needs besides the layers' recording (a context manager); none by default."""
        return nullcontext()

    def _attach_outputs(self, output, names: list[str]):
        """Add the call's adapter outputs (of the adapters ``names`` that ran) to the model's output."""
        if not hasattr(output, "keys"):
            return output
        fields, loss = self.call_fields(names, output.get("loss"))
        for key, value in fields.items():
            output[key] = value
        if loss is not None:
            output["loss"] = loss
        return output

    def call_fields(self, adapter_names: list[str],
                    base_loss: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
        """``call_outputs``, with ``aux_loss`` and ``routing_weights`` always among the fields."""
        fields, loss = self.call_outputs(adapter_names, base_loss)
        fields.setdefault("aux_loss", self.zero())
        fields.setdefault("routing_weights", self.routing_weights(adapter_names))
        return fields, loss

    def call_outputs(self, adapter_names: list[str],
                     base_loss: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
        """The fields a call adds to the model's output and its loss (None: keep the base model's)."""
        raise NotImplementedError

    def routing_weights(self, adapter_names: list[str]) -> torch.Tensor | dict:
        """Routing weights recorded in this call, (sites, batch, K) per adapter (a dict for several adapters);
        (0, batch, 0) where an adapter routes nothing."""
        batch = self.batch_size()
        stacked = {name: torch.stack(self.context.routing[name]) if self.context.routing.get(name)
                   else self.zero().new_zeros(0, batch, 0) for name in adapter_names}
        return stacked[adapter_names[0]] if len(stacked) == 1 else stacked

    def aux_loss(self, adapter_names: list[str]) -> torch.Tensor:
        """Mean auxiliary loss of the routing sites recorded in this call (0 where there are none)."""
        losses = [loss for name in adapter_names for loss in self.context.aux_losses.get(name, [])]
        return torch.stack(losses).mean() if losses else self.zero()

    def zero(self) -> torch.Tensor:
        """A scalar 0 on the model's device."""
        parameter = next(self.model.parameters())
        return torch.zeros((), device=parameter.device)

    def batch_size(self) -> int:
        """The batch size of the current call (the first dimension of its first tensor input; 0 without one)."""
        for value in self.context.inputs.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return value.shape[0]
        return 0

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put the wrapper in place of the block, with its adapter modules on the block's device."""
        setattr(parent, child_name, new_module)
        parameter = next(child.parameters(), None)
        if parameter is None or parameter.device.type == "meta":
            return
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(parameter.device)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint key of a model key: the adapter name follows one of the layer's adapter containers
        (``altmoe_connector.<name>.experts.w1``, ``s3_core.<name>.keys``), so it is removed right after the container,
        wherever that sits in the key; checkpoints then load under any adapter name."""
        layer = cls.tuner_layer_cls
        containers = "|".join(map(re.escape, layer.adapter_layer_names + layer.other_param_names))
        return re.sub(rf"((?:^|\.)(?:{containers}))\.{re.escape(adapter_name)}(?=\.|$)", r"\1", key, count=1)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's load-time key mapping, after weights saved under earlier key parts (``renamed_key_parts``) are
        given their current names."""
        if cls.renamed_key_parts:
            state_dict = {".".join(cls.renamed_key_parts.get(part, part) for part in key.split(".")): value
                          for key, value in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

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
            name = self._largest_size_field(peft_config)
            raise ConfigError(
                name, f"This {self.method_name} config would create about {count:,} adapter parameters "
                f"({count * 4 / 2**30:.1f} GiB in float32), above the limit of {MAX_ADAPTER_PARAMETERS:,}; lower "
                f"{name} (now {getattr(peft_config, name):,})."
            )

    def _largest_size_field(self, peft_config) -> str:
        """The integer field whose reset to its default shrinks the adapter the most."""
        sizes = {}
        for spec in fields(peft_config):
            value = getattr(peft_config, spec.name)
            if str(spec.type).startswith("int") and isinstance(value, int) and value != spec.default:
                try:
                    sizes[spec.name] = self.estimated_parameters(replace(peft_config, **{spec.name: spec.default}))
                except (ConfigError, TypeError):  # a default that is invalid beside the other fields
                    continue
        return min(sizes, key=sizes.get) if sizes else "num_experts"

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
