"""What the Alt-MoE connector returns and reads: its output class, the towers' token features, the regression loss,
and the tap on a tower's last block that captures them."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ..towers import Tower
from .layer import DirectionPrediction


@dataclass
class TokenFeatures:
    """Per-token features of both towers (mean of their last two hidden layers) with masks of the real tokens."""

    image_tokens: torch.Tensor
    image_mask: torch.Tensor
    text_tokens: torch.Tensor
    text_mask: torch.Tensor


@dataclass
class AltMoEOutput(ModelOutput):
    """Connector output. ``image_embeds`` / ``text_embeds`` are aligned so that their dot product is the mean of the
    two directions' cosine similarities; ``logits_per_image`` / ``logits_per_text`` are it over the temperature.
    ``vision_to_text`` / ``text_to_vision`` hold each direction's own prediction (None for a direction not run);
    ``routing_weights`` (sites, batch, K) the gate weights averaged over each example's real tokens, one site per
    direction run and branch (contrastive, regression)."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    vision_to_text: DirectionPrediction | None = None
    text_to_vision: DirectionPrediction | None = None
    vision_target_embeds: torch.Tensor | None = None
    text_target_embeds: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    routing_weights: torch.Tensor | None = None


def regression_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Latent regression onto the (frozen, detached) target tower's pooled features."""
    target = target.detach()
    return F.smooth_l1_loss(prediction, target) if kind == "smooth_l1" else F.mse_loss(prediction, target)


def _hidden(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def tap_last_block(tower: Tower, receive):
    """While active, hand ``(hidden_states[-2] + hidden_states[-1]) / 2`` of ``tower`` (its last block's input and
    output) to ``receive`` each time the tower runs."""

    def hook(module, args, kwargs, output):
        inputs = args[0] if args else kwargs["hidden_states"]
        receive((inputs + _hidden(output)) / 2)

    handle = tower.blocks[-1].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
