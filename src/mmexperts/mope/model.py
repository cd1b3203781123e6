"""The MoPE tuner: injects MoPE block wrappers into both towers and runs the complementary tower first."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..conditioning import complementary_first, gather_inputs
from ..tuners import TwoTowerTuner
from .config import MoPEConfig
from .layer import DEEP, ROUTED, MoPEForwardState, MoPELayer

HEAD_NAMES = ("classifier",)


class MoPEModel(TwoTowerTuner):
    """PEFT tuner for Mixture of Prompt Experts; see :class:`~mmexperts.MoPEConfig`."""

    prefix: str = "mope_"
    method_name = "MoPE"
    forward_state_cls = MoPEForwardState
    tuner_layer_cls = MoPELayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: MoPEConfig, model_config: dict) -> MoPEConfig:
        towers = self.towers
        self._record_tower_sizes(peft_config)
        prompted, complementary = towers[peft_config.prompted_tower], towers[peft_config.complementary_tower]
        layers = peft_config.routed_layers
        if layers is None:
            layers = list(range(len(prompted.blocks)))
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < len(prompted.blocks)]
        if bad or not layers:
            raise ValueError(f"routed_layers must be indices in [0, {len(prompted.blocks)}) of the "
                             f"{peft_config.prompted_tower} tower's blocks, got {peft_config.routed_layers!r}.")
        if peft_config.target_modules is None:
            targets = [prompted.block_names[i] for i in sorted(layers)]
            if peft_config.complementary_prompt_length:
                targets += complementary.block_names
            peft_config.target_modules = targets
        heads = [name for name in HEAD_NAMES if isinstance(getattr(self.model, name, None), nn.Module)]
        if heads:
            peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(heads))
        return peft_config

    size_fields = ("num_experts", "prompt_length", "mapper_hidden_size")

    def estimated_parameters(self, peft_config: MoPEConfig) -> int:
        c = peft_config
        prompted, complementary = (self.towers[c.prompted_tower].hidden_size,
                                   self.towers[c.complementary_tower].hidden_size)
        blocks = len(c.routed_layers) if c.routed_layers is not None else len(self.towers[c.prompted_tower].blocks)
        router = c.num_experts and (prompted + 1) * c.router_self_dim + (complementary + 1) * c.router_cross_dim + (
            c.router_self_dim + c.router_cross_dim + 1) * c.num_experts
        per_block = (c.static_prompt_length + c.num_experts * c.prompt_length) * prompted + router
        mapper = (complementary + 1) * c.mapper_hidden_size + (c.mapper_hidden_size + 1) * c.mapped_prompt_length * prompted
        deep = len(self.towers[c.complementary_tower].blocks) * c.complementary_prompt_length * complementary
        return blocks * per_block + mapper + deep

    def _create_and_replace(self, peft_config: MoPEConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: str | None = None) -> None:
        towers = self.towers
        prompted = towers[peft_config.prompted_tower]
        routed_names = [n for n in prompted.block_names if self._check_target_module_exists(peft_config, n)]
        role = ROUTED if current_key in prompted.block_names else DEEP
        owns_mapper = bool(routed_names) and current_key == routed_names[0]
        if isinstance(target, MoPELayer):
            target.update_layer(adapter_name, peft_config, role, owns_mapper)
            return
        complementary_size = towers[peft_config.complementary_tower].hidden_size
        new_module = MoPELayer(target, self.forward_state, complementary_size)
        new_module.update_layer(adapter_name, peft_config, role, owns_mapper)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_new_adapter_config(self, config: MoPEConfig) -> None:
        for name, existing in self.peft_config.items():
            if existing is not config and existing.prompted_tower != config.prompted_tower:
                raise ValueError(
                    f"Adapter {name!r} prompts the {existing.prompted_tower} tower, the new one the "
                    f"{config.prompted_tower} tower; all MoPE adapters on one model must prompt the same tower."
                )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        configs = [self.peft_config[name] for name in self.active_adapters if name in self.peft_config]
        if not configs:
            yield
            return
        state = self.forward_state
        state.reset()
        config = configs[0]
        towers = self.towers
        inputs = gather_inputs(self.model, args, kwargs)
        with complementary_first(towers[config.prompted_tower], towers[config.complementary_tower], inputs,
                                 self._keep_complementary):
            handle = self.model.register_forward_hook(self._attach_outputs)
            try:
                yield
            finally:
                handle.remove()
                state.reset()  # drop the call's activations and graph

    def _keep_complementary(self, feature: torch.Tensor) -> None:
        self.forward_state.complementary = feature

    def _attach_outputs(self, module, args, output):
        state = self.forward_state
        if not state.aux_losses or not hasattr(output, "keys"):
            return output
        names = [name for name in self.active_adapters if name in state.aux_losses]
        losses = [loss for name in names for loss in state.aux_losses[name]]
        aux = torch.stack(losses).mean()
        routing = {name: torch.stack(state.routing[name]) for name in names}
        output["aux_loss"] = aux
        output["routing_weights"] = routing[names[0]] if len(names) == 1 else routing
        if output.get("loss") is not None:
            weight = max(self.peft_config[name].importance_loss_weight for name in names)
            output["loss"] = output["loss"] + weight * aux.to(output["loss"].dtype)
        return output

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config: MoPEConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key, tensor in state_dict.items():
            if "mope_experts" in key and tuple(tensor.shape[:2]) != (config.num_experts, config.prompt_length):
                raise ValueError(
                    f"The saved adapter has {tensor.shape[0]} prompt experts of {tensor.shape[1]} tokens per block "
                    f"({key}), but the config asks for num_experts={config.num_experts}, "
                    f"prompt_length={config.prompt_length}. Load it with its own adapter_config.json (omit `config=`)."
                )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
