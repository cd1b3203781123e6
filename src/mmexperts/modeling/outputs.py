"""Outputs of the base models; each has the ``aux_loss`` and ``routing_weights`` fields that the mixture-of-experts
adapters fill (``tuners.TwoTowerTuner``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class VisionTextClassifierOutput(ModelOutput):
    """Classifier output; ``aux_loss`` and ``routing_weights`` are filled by mixture-of-experts adapters."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    vision_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    routing_weights: torch.Tensor | dict | None = None



@dataclass
class FeatureClassifierOutput(ModelOutput):
    """Output of :class:`FeatureEncoderForClassification`; adapters add their own fields (routing, aux loss...)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    modality_a_embeds: torch.Tensor | None = None
    modality_b_embeds: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    routing_weights: torch.Tensor | dict | None = None
