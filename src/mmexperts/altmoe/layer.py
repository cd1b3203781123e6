"""The Alt-MoE connector (shared gate + experts, per-direction projections and heads) and the layer hosting it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..context import CallContext
from ..moe import ExpertMLPs, Router, switch_balance_loss
from ..towers import masked_mean
from ..tuners import UnmergeableLayer
from .config import DIRECTIONS, RENAMED_DIRECTIONS, AltMoEConfig

SOURCE = {"vision_to_text": "vision", "text_to_vision": "text"}
TARGET = {"vision_to_text": "text", "text_to_vision": "vision"}
BRANCHES = ("contrastive", "regression")


def check_direction(direction: str) -> str:
    """Return ``direction`` if it is a known direction name, else raise a clear error."""
    if direction not in DIRECTIONS:
        renamed = f" ({direction!r} is now called {RENAMED_DIRECTIONS[direction]!r})" \
            if direction in RENAMED_DIRECTIONS else ""
        raise ValueError(f"Unknown Alt-MoE direction {direction!r}; expected one of {DIRECTIONS} "
                         f"(or None for both directions at once){renamed}.")
    return direction


@dataclass
class DirectionPrediction:
    """One direction's connector output for a batch: pooled contrastive embedding, predicted target latent,
    routing weights of the real tokens per branch (real tokens, K), the gate's load-balance loss, and per branch the
    routing weights averaged over each example's real tokens (batch, K)."""

    embeds: torch.Tensor
    latent: torch.Tensor
    routing: dict[str, torch.Tensor]
    balance_loss: torch.Tensor
    example_routing: dict[str, torch.Tensor]


class AltMoEConnector(nn.Module):
    """One adapter's connector: shared ``router`` + ``experts`` + task embeddings + post-expert norms, and per
    direction an input projection, a direction embedding, a contrastive head and a regression head; per modality a
    linear projection of its pooled features into the contrastive space (the target side of InfoNCE)."""

    def __init__(self, config: AltMoEConfig, vision_size: int, text_size: int, device=None):
        super().__init__()
        sizes = {"vision": vision_size, "text": text_size}
        width = config.hidden_size
        self.sizes = sizes
        self.pooled_input = config.pooled_input
        self.direction_embeds = nn.ParameterDict(
            {d: nn.Parameter(torch.randn(sizes[SOURCE[d]], device=device) * 0.02) for d in DIRECTIONS})
        self.input_projections = nn.ModuleDict({d: nn.Linear(sizes[SOURCE[d]], width, device=device)
                                                for d in DIRECTIONS})
        self.task_embeds = nn.ParameterDict({b: nn.Parameter(torch.randn(width, device=device) * 0.02)
                                             for b in BRANCHES})
        self.router = Router(width, config.num_experts, noise_std=config.router_noise_std, top_k=config.top_k,
                             learn_keys=True, renormalize=config.renormalize, device=device)
        self.experts = ExpertMLPs(config.num_experts, width, config.expert_hidden_size or width, width,
                                  dropout=config.dropout, dispatch=config.dispatch, device=device)
        self.norms = nn.ModuleDict({b: nn.LayerNorm(width, device=device) for b in BRANCHES})
        if config.init_weights:
            for norm in self.norms.values():
                nn.init.zeros_(norm.weight)
        self.contrastive_heads = nn.ModuleDict({d: nn.Linear(width, width, device=device) for d in DIRECTIONS})
        self.regression_heads = nn.ModuleDict({d: nn.Linear(width, sizes[TARGET[d]], device=device)
                                               for d in DIRECTIONS})
        self.target_projections = nn.ModuleDict({m: nn.Linear(sizes[m], width, device=device) for m in sizes})

    def direction_parameters(self, direction: str) -> list[nn.Parameter]:
        """Parameters used by ``direction`` only (its projections, embedding, heads and target projection)."""
        check_direction(direction)
        modules = (self.input_projections[direction], self.contrastive_heads[direction],
                   self.regression_heads[direction], self.target_projections[TARGET[direction]])
        return [self.direction_embeds[direction], *(p for m in modules for p in m.parameters())]

    def _branch(self, tokens: torch.Tensor, real: torch.Tensor, branch: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
        """``gelu(LN(MoE(z + e_branch))) + z + e_branch`` over real tokens, routed through the shared gate."""
        routed = tokens + self.task_embeds[branch]
        gate = self.router(routed[real])
        experts = self.experts(routed[real], gate.weights)
        mixed = experts.new_zeros(routed.shape)  # the experts' dtype, which autocast may lower
        mixed[real] = experts
        balance = switch_balance_loss(gate.logits.softmax(-1)) if gate.logits.shape[0] else routed.new_zeros(())
        return F.gelu(self.norms[branch](mixed)) + routed, gate.weights, balance

    def predict(self, direction: str, tokens: torch.Tensor, mask: torch.Tensor) -> DirectionPrediction:
        """Run ``direction`` on source token features (batch, length, dim) with their mask (batch, length)."""
        check_direction(direction)
        if self.pooled_input:
            tokens, mask = masked_mean(tokens, mask).unsqueeze(1), mask.new_ones(mask.shape[0], 1)
        real = mask.bool()
        projected = F.gelu(self.input_projections[direction](tokens + self.direction_embeds[direction]))
        outputs, routing, balance = {}, {}, []
        for branch in BRANCHES:
            outputs[branch], routing[branch], loss = self._branch(projected, real, branch)
            balance.append(loss)
        embeds = self.contrastive_heads[direction](masked_mean(outputs["contrastive"], mask))
        latent = self.regression_heads[direction](masked_mean(outputs["regression"], mask))
        per_example = {}
        for branch, weights in routing.items():
            full = weights.new_zeros(*real.shape, weights.shape[-1])
            full[real] = weights
            per_example[branch] = masked_mean(full, real)
        return DirectionPrediction(embeds, latent, routing, torch.stack(balance).mean(), per_example)

    def target(self, modality: str, pooled: torch.Tensor) -> torch.Tensor:
        """A modality's pooled features projected into the contrastive space (linear, so pooling first is exact)."""
        return self.target_projections[modality](pooled)


class AltMoELayer(UnmergeableLayer, nn.Module, BaseTunerLayer):
    """Hosts the Alt-MoE connectors (one per adapter) inside the model, wrapping the text tower's last block.

    PEFT keeps adapter weights inside the modules it replaces; the connector reads both towers' token features after
    the base model ran, so the wrapped block itself runs unchanged.
    """

    adapter_layer_names = ("altmoe_connector",)
    method_name = "Alt-MoE"
    merge_reason = "An Alt-MoE connector is a separate network on the towers' outputs"
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, context: CallContext, vision_size: int, text_size: int, **kwargs):
        super().__init__()
        self.base_layer = base_layer
        self._context = context
        self.vision_size, self.text_size = vision_size, text_size
        self.in_features = self.out_features = text_size
        self.altmoe_connector = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config: AltMoEConfig) -> None:
        """Create the connector of one adapter, on the device of the wrapped block."""
        parameter = next(self.base_layer.parameters(), None)
        device = parameter.device if parameter is not None and parameter.device.type != "meta" else None
        self.altmoe_connector[adapter_name] = AltMoEConnector(config, self.vision_size, self.text_size, device=device)
        self.set_adapter(self.active_adapters)

    def forward(self, *args, **kwargs):
        if not self.disable_adapters and any(name in self.altmoe_connector for name in self.active_adapters):
            self._context.require(self.method_name)
        return self.base_layer(*args, **kwargs)

    def __repr__(self) -> str:
        return "altmoe." + super().__repr__()
