"""What every mmexperts tuner shares: the model's towers (found once) and the tower widths its config records."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner

from .towers import Tower, find_towers

MODALITIES = ("vision", "text")


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
