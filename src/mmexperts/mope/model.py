"""The MoPE tuner: injects MoPE block wrappers into both towers and runs the complementary tower first."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..conditioning import complementary_first
from ..errors import ConfigError
from ..towers import Tower, masked_mean
from ..tuners import TwoTowerTuner
from .config import MoPEConfig
from .layer import DEEP, ROUTED, MoPELayer

HEAD_NAMES = ("classifier",)
# A VisionTextDualEncoderModel assembled from two towers (or from configs) draws these at random when it is built
DUAL_ENCODER_PROJECTIONS = ("visual_projection", "text_projection")


def trained_heads(model: nn.Module, new_adapter: bool = True) -> list[str]:
    """The modules over the towers that MoPE trains and saves with the adapter (PEFT's ``modules_to_save``): the
    classifier head, and for a ``new_adapter`` the projections of a dual encoder assembled from two towers, which are
    random (a dual encoder loaded whole, with a recorded ``_name_or_path``, keeps its trained projections frozen; a
    saved adapter's config already lists what it saved)."""
    heads = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    config = getattr(model, "config", None)
    if new_adapter and getattr(config, "model_type", None) == "vision-text-dual-encoder" and not getattr(
            config, "_name_or_path", ""):
        heads += [name for name in DUAL_ENCODER_PROJECTIONS if isinstance(getattr(model, name, None), nn.Module)]
    return heads


class MoPEModel(TwoTowerTuner):
    """PEFT tuner for Mixture of Prompt Experts; see :class:`~mmexperts.MoPEConfig`."""

    prefix: str = "mope_"
    method_name = "MoPE"
    tuner_layer_cls = MoPELayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: MoPEConfig, model_config: dict) -> MoPEConfig:
        towers = self.towers
        new_adapter = peft_config.vision_hidden_size is None  # recorded at the first injection, saved with it
        self._record_tower_sizes(peft_config)
        prompted, complementary = towers[peft_config.prompted_tower], towers[peft_config.complementary_tower]
        layers = peft_config.routed_layers
        if layers is None:
            layers = list(range(len(prompted.blocks)))
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < len(prompted.blocks)]
        if bad or not layers:
            raise ConfigError("routed_layers", f"routed_layers must be indices in [0, {len(prompted.blocks)}) of the "
                              f"{peft_config.prompted_tower} tower's blocks, got {peft_config.routed_layers!r}.")
        if peft_config.target_modules is None:
            targets = [prompted.block_names[i] for i in sorted(layers)]
            if peft_config.complementary_prompt_length:
                targets += complementary.block_names
            peft_config.target_modules = targets
        heads = trained_heads(self.model, new_adapter)
        if heads:
            peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(heads))
        return peft_config

    def estimated_parameters(self, peft_config: MoPEConfig) -> int:
        c = peft_config
        prompted, complementary = (self.towers[c.prompted_tower].hidden_size,
                                   self.towers[c.complementary_tower].hidden_size)
        blocks = len(c.routed_layers) if c.routed_layers is not None else len(self.towers[c.prompted_tower].blocks)
        router = c.num_experts and (prompted + 1) * c.router_self_size + (complementary + 1) * c.router_cross_size + (
            c.router_self_size + c.router_cross_size + 1) * c.num_experts
        per_block = (c.static_prompt_length + c.num_experts * c.prompt_length) * prompted + router
        mapper = ((complementary + 1) * c.mapper_hidden_size
                  + (c.mapper_hidden_size + 1) * c.mapped_prompt_length * prompted)
        deep = len(self.towers[c.complementary_tower].blocks) * c.complementary_prompt_length * complementary
        return blocks * per_block + mapper + deep

    def _create_and_replace(self, peft_config: MoPEConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: str | None = None) -> None:
        towers = self.towers
        prompted = towers[peft_config.prompted_tower]
        routed_names = [n for n in prompted.block_names if self._check_target_module_exists(peft_config, n)]
        role = ROUTED if current_key in prompted.block_names else DEEP
        owns_mapper = bool(routed_names) and current_key == routed_names[0]
        last_block = current_key == prompted.block_names[-1]
        if isinstance(target, MoPELayer):
            target.update_layer(adapter_name, peft_config, role, owns_mapper, last_block)
            return
        complementary_size = towers[peft_config.complementary_tower].hidden_size
        new_module = MoPELayer(target, self.context, complementary_size)
        new_module.update_layer(adapter_name, peft_config, role, owns_mapper, last_block)
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
    def call_hooks(self, inputs: dict, adapter_names: list[str]):
        """The complementary tower runs first; its feature and the mapped prompts reach the context before the
        prompted tower runs. With ``head_pooling='mean'`` the head reads the prompted tower's mean token."""
        config = self.peft_config[adapter_names[0]]
        towers = self.towers
        prompted = towers[config.prompted_tower]
        with complementary_first(prompted, towers[config.complementary_tower], inputs,
                                 lambda feature: self._receive_complementary(feature, adapter_names)):
            head = getattr(self.model, "classifier", None)
            if config.head_pooling != "mean" or not isinstance(head, nn.Module):
                yield
                return
            handles = [prompted.module.register_forward_hook(
                           lambda module, args, output: self._keep_tokens(prompted, inputs, output)),
                       head.register_forward_pre_hook(lambda module, args: self._mean_token_to_head(prompted, args))]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

    def _keep_tokens(self, prompted: Tower, inputs: dict, output) -> None:
        tokens = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        mask = inputs.get("attention_mask") if prompted.modality == "text" else None
        self.context.tokens[prompted.modality] = (tokens, mask)

    def _mean_token_to_head(self, prompted: Tower, args: tuple) -> tuple:
        """Swap the prompted tower's pooled summary in the head's input for its mean output token (prompt tokens
        included, each after the tower's final norm), through the base model's own head dropout."""
        tokens, mask = self.context.tokens[prompted.modality]
        real = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
        if self.context.prompt_outputs is not None:
            prompts = self.context.prompt_outputs.to(tokens.dtype)
            tokens = torch.cat([prompts, tokens], 1)
            real = torch.cat([real.new_ones(prompts.shape[:2]), real], 1)
        if prompted.final_norm is not None:
            tokens = prompted.final_norm(tokens)
        pooled = getattr(self.model, "dropout", nn.Identity())(masked_mean(tokens, real))
        features, start = args[0], 0
        read = getattr(self.model.config, "classifier_input", prompted.modality)
        if read == "concat":
            start = 0 if prompted.modality == "vision" else self.towers["vision"].hidden_size
        elif read != prompted.modality:
            return args
        return (torch.cat([features[:, :start], pooled.to(features.dtype),
                           features[:, start + pooled.shape[-1]:]], -1), *args[1:])

    def _receive_complementary(self, feature: torch.Tensor, adapter_names: list[str]) -> None:
        """Keep the complementary feature and map it into each adapter's prompt, once per call."""
        self.context.complementary = feature
        for layer in self.tuner_layers():
            for name in adapter_names:
                if name in layer.mope_mapper_in:
                    self.context.mapped[name] = layer.map_feature(name, feature)

    def call_outputs(self, adapter_names: list[str], base_loss):
        aux = self.aux_loss(adapter_names)
        fields = {"aux_loss": aux}
        if base_loss is None:
            return fields, None
        weight = max(self.peft_config[name].importance_loss_weight for name in adapter_names)
        return fields, base_loss + weight * aux.to(base_loss.dtype)

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
