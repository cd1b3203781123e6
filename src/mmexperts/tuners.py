"""What every mmexperts tuner shares: the model's towers (found once), the tower widths its config records, and the
config fields PEFT needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .towers import Tower, find_towers

MODALITIES = ("vision", "text")


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
