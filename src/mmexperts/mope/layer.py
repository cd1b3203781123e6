"""MoPE block wrapper: builds the static, routed and mapped prompts of one block and hands them to its attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..context import CallContext
from ..moe import Router, importance_loss
from ..prefix import PREFIX_KWARG, PrefixAttention, with_prompt_tokens
from ..towers import key_padding_mask, masked_mean
from ..tuners import UnmergeableLayer
from .config import MoPEConfig

ROUTED, DEEP = "routed", "deep"


def _prompt_init(hidden_size: int) -> float:
    return math.sqrt(6.0 / (3 * 16 * 16 + hidden_size))  # VPT's uniform bound for 16x16 patches


class MoPELayer(UnmergeableLayer, nn.Module, BaseTunerLayer):
    """Wraps one frozen transformer block. ``routed`` blocks (prompted tower) build ``[static; dynamic; mapped]``
    prompts, the dynamic one a router-weighted sum of prompt experts; ``deep`` blocks (complementary tower) use plain
    deep prompts. Prompts are tokens the block processes with the real ones (``prompt_mode='tokens'``) or prefix
    keys/values of its self-attention behind a zero-init per-head gate (``'prefix'``)."""

    method_name = "MoPE"
    merge_reason = "MoPE prompts are input-dependent"
    adapter_layer_names = ("mope_static", "mope_experts", "mope_self_proj", "mope_cross_proj", "mope_router",
                           "mope_mapper_in", "mope_mapper_out", "mope_gate")
    other_param_names = ("mope_role", "mope_settings")

    def __init__(self, base_layer: nn.Module, context: CallContext, complementary_size: int, **kwargs):
        super().__init__()
        self.base_layer = base_layer
        self._prefix = PrefixAttention(base_layer)
        self._context = context
        anatomy = self._prefix.anatomy
        self.hidden_size = anatomy.key.in_features
        self.num_heads = anatomy.num_heads
        self.in_features = self.out_features = self.hidden_size
        self.complementary_size = complementary_size
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict() if name in ("mope_static", "mope_experts", "mope_gate")
                    else nn.ModuleDict())
        self.mope_role: dict[str, str] = {}
        self.mope_settings: dict[str, dict] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config: MoPEConfig, role: str, owns_mapper: bool,
                     last_block: bool = False) -> None:
        """Create the prompts (and router, mapper) of one adapter in this block; ``last_block``: the prompted tower's
        last block, whose prompt outputs the head reads with ``head_pooling='mean'``."""
        device = next(self.base_layer.parameters()).device
        d, bound = self.hidden_size, _prompt_init(self.hidden_size)

        def prompts(*shape):
            return nn.Parameter(torch.empty(*shape, d, device=device).uniform_(-bound, bound))

        self.mope_role[adapter_name] = role
        static_length = config.static_prompt_length if role == ROUTED else config.complementary_prompt_length
        if static_length:
            self.mope_static[adapter_name] = prompts(static_length)
        if role == ROUTED and config.num_experts:
            self.mope_experts[adapter_name] = prompts(config.num_experts, config.prompt_length)
            if config.router_self_size:
                self.mope_self_proj[adapter_name] = nn.Linear(d, config.router_self_size, device=device)
            if config.router_cross_size:
                self.mope_cross_proj[adapter_name] = nn.Linear(self.complementary_size, config.router_cross_size,
                                                               device=device)
            self.mope_router[adapter_name] = Router(config.router_self_size + config.router_cross_size,
                                                    config.num_experts, config.router_temperature,
                                                    config.router_noise_std, device=device)
        if role == ROUTED and owns_mapper and config.mapped_prompt_length:
            self.mope_mapper_in[adapter_name] = nn.Linear(self.complementary_size, config.mapper_hidden_size,
                                                          device=device)
            self.mope_mapper_out[adapter_name] = nn.Linear(config.mapper_hidden_size,
                                                           config.mapped_prompt_length * d, device=device)
        if config.prompt_mode == "prefix":
            gate = torch.zeros(self.num_heads, device=device)
            if not config.init_weights:
                gate.normal_(0.0, 1.0)
            self.mope_gate[adapter_name] = nn.Parameter(gate)
        self.mope_settings[adapter_name] = {
            "prompt_mode": config.prompt_mode,
            "mapped_prompt_length": config.mapped_prompt_length if role == ROUTED else 0,
            "importance_threshold": config.importance_threshold,
            "prompt_dropout": config.prompt_dropout,
            "keeps_prompt_outputs": last_block and role == ROUTED and config.head_pooling == "mean",
        }
        self.set_adapter(self.active_adapters)

    def _detach(self) -> None:
        self._prefix.remove()

    def map_feature(self, name: str, complementary: torch.Tensor) -> torch.Tensor:
        """The mapped prompt: a two-layer GELU MLP of the complementary feature, reshaped into prompt tokens."""
        hidden = F.gelu(self.mope_mapper_in[name](complementary.to(self.mope_mapper_in[name].weight.dtype)))
        tokens = F.gelu(self.mope_mapper_out[name](hidden))
        return tokens.view(complementary.shape[0], self.mope_settings[name]["mapped_prompt_length"], -1)

    def _route(self, name: str, hidden_states: torch.Tensor, attention_mask, complementary) -> torch.Tensor:
        """Mix the prompt experts with routing weights from the block's own tokens and the complementary feature."""
        batch, length, _ = hidden_states.shape
        queries = []
        if name in self.mope_self_proj:
            summary = masked_mean(hidden_states, key_padding_mask(attention_mask, length, batch, hidden_states.device))
            queries.append(self.mope_self_proj[name](summary.to(self.mope_self_proj[name].weight.dtype)))
        if name in self.mope_cross_proj:
            queries.append(self.mope_cross_proj[name](complementary.to(self.mope_cross_proj[name].weight.dtype)))
        routing = self.mope_router[name](torch.cat(queries, -1)).weights
        self._context.record(name, routing, importance_loss(routing, self.mope_settings[name]["importance_threshold"]))
        return torch.einsum("bk,kpd->bpd", routing, self.mope_experts[name])

    def _routed_prompts(self, name: str, hidden_states: torch.Tensor, attention_mask) -> torch.Tensor:
        self._context.require(self.method_name)
        complementary = self._context.complementary
        if complementary is None:
            raise ValueError(
                "A MoPE routed block ran without the complementary tower's feature. Call the model with both "
                "modalities, e.g. model(pixel_values=..., input_ids=..., attention_mask=...)."
            )
        parts = []
        if name in self.mope_static:
            parts.append(self.mope_static[name].expand(hidden_states.shape[0], -1, -1))
        if name in self.mope_experts:
            parts.append(self._route(name, hidden_states, attention_mask, complementary))
        if self.mope_settings[name]["mapped_prompt_length"]:
            parts.append(self._context.mapped[name])
        return torch.cat(parts, 1)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.disable_adapters:
            return self.base_layer(hidden_states, *args, **kwargs)
        attention_mask = args[0] if args else kwargs.get("attention_mask")
        prefixes = list(kwargs.pop(PREFIX_KWARG, None) or [])
        tokens = []
        for name in self.active_adapters:
            if name not in self.mope_role:
                continue
            if self.mope_role[name] == ROUTED:
                prompts = self._routed_prompts(name, hidden_states, attention_mask)
            else:
                prompts = self.mope_static[name].expand(hidden_states.shape[0], -1, -1)
            prompts = nn.functional.dropout(prompts, self.mope_settings[name]["prompt_dropout"], self.training)
            if self.mope_settings[name]["prompt_mode"] == "prefix":
                prefixes.append((prompts, self.mope_gate[name]))
            else:
                tokens.append(prompts)
        if prefixes:
            kwargs[PREFIX_KWARG] = prefixes
        if tokens:
            keeps = any(self.mope_settings[name].get("keeps_prompt_outputs") for name in self.active_adapters
                        if name in self.mope_settings)
            return with_prompt_tokens(self.base_layer, torch.cat(tokens, 1), hidden_states, args, kwargs,
                                      keep_prompts=self._keep_prompt_outputs if keeps else None)
        return self.base_layer(hidden_states, *args, **kwargs)

    def _keep_prompt_outputs(self, outputs: torch.Tensor) -> None:
        self._context.prompt_outputs = outputs

    def __repr__(self) -> str:
        return "mope." + super().__repr__()
