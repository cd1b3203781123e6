"""``FeatureEncoderForClassification``: two small transformer towers over pre-extracted feature sequences and a
classification head."""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .outputs import FeatureClassifierOutput


@strict
class FeatureEncoderConfig(PreTrainedConfig):
    """Config of :class:`FeatureEncoderForClassification`: two small transformer towers over pre-extracted per-modality
    feature sequences (MultiBench-style data, e.g. OpenFace vision + GloVe text features) and a head."""

    model_type = "feature-encoder-classification"
    attribute_map = {"feature_dim_a": "feature_size_a", "feature_dim_b": "feature_size_b"}  # earlier names

    feature_size_a: int = 32
    feature_size_b: int = 32
    hidden_size: int = 40
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 80
    hidden_dropout_prob: float = 0.0
    classifier_dropout: float = 0.0
    initializer_range: float = 0.02


class FeatureBlock(nn.Module):
    """Pre-norm transformer block; ``attention_mask`` (batch, tokens) is true (or 1) on real tokens."""

    def __init__(self, config: FeatureEncoderConfig):
        super().__init__()
        size = config.hidden_size
        self.attention_norm = nn.LayerNorm(size)
        self.attention = nn.MultiheadAttention(size, config.num_attention_heads, dropout=config.hidden_dropout_prob,
                                               batch_first=True)
        self.mlp_norm = nn.LayerNorm(size)
        self.mlp = nn.Sequential(nn.Linear(size, config.intermediate_size), nn.GELU(),
                                 nn.Linear(config.intermediate_size, size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        padding = None if attention_mask is None else ~attention_mask.bool()
        normed = self.attention_norm(hidden_states)
        attended, _ = self.attention(normed, normed, normed, key_padding_mask=padding, need_weights=False)
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))


class FeatureTower(nn.Module):
    """One modality: a linear projection of its feature sequence, a [CLS] token, transformer blocks, a final norm.

    No positional encoding (as CoMM's MultiBench encoders). The [CLS] output is the tower's summary.
    """

    def __init__(self, config: FeatureEncoderConfig, feature_size: int):
        super().__init__()
        self.config = config
        self.projection = nn.Linear(feature_size, config.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.layers = nn.ModuleList(FeatureBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutputWithPooling:
        batch, length, _ = features.shape
        hidden = self.projection(features.to(self.projection.weight.dtype))
        hidden = torch.cat([self.cls_token.expand(batch, -1, -1), hidden], 1)
        mask = torch.ones(batch, length + 1, dtype=torch.bool, device=features.device)
        if attention_mask is not None:
            mask[:, 1:] = attention_mask.bool()
        for layer in self.layers:
            hidden = layer(hidden, mask)
        hidden = self.norm(hidden)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=hidden[:, 0])


class FeatureEncoderForClassification(PreTrainedModel):
    """Two :class:`FeatureTower` s (``modality_a_model``, ``modality_b_model``, found by ``find_towers`` in the vision
    and text slots) over pre-extracted feature sequences, and a linear head over their concatenated [CLS] outputs."""

    config_class = FeatureEncoderConfig
    config: FeatureEncoderConfig
    base_model_prefix = "feature_encoder"
    main_input_name = "features_a"
    # which call inputs each tower takes, under its own argument names (read by find_towers)
    tower_inputs = {"vision": {"features_a": "features", "attention_mask_a": "attention_mask"},
                    "text": {"features_b": "features", "attention_mask_b": "attention_mask"}}

    def __init__(self, config: FeatureEncoderConfig):
        super().__init__(config)
        self.modality_a_model = FeatureTower(config, config.feature_size_a)
        self.modality_b_model = FeatureTower(config, config.feature_size_b)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(2 * config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, features_a: torch.Tensor | None = None, features_b: torch.Tensor | None = None,
                attention_mask_a: torch.Tensor | None = None, attention_mask_b: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_dict: bool | None = None,
                **kwargs) -> FeatureClassifierOutput | tuple:
        if features_a is None or features_b is None:
            missing = [n for n, v in (("features_a", features_a), ("features_b", features_b)) if v is None]
            raise ValueError(f"FeatureEncoderForClassification needs both modalities; missing {missing}.")
        embeds_a = self.modality_a_model(features_a, attention_mask_a).pooler_output
        embeds_b = self.modality_b_model(features_b, attention_mask_b).pooler_output
        logits = self.classifier(self.dropout(torch.cat([embeds_a, embeds_b], -1)))
        loss = ForSequenceClassificationLoss(labels, logits, self.config) if labels is not None else None
        output = FeatureClassifierOutput(loss=loss, logits=logits, modality_a_embeds=embeds_a,
                                         modality_b_embeds=embeds_b)
        return output if return_dict is not False else output.to_tuple()



AutoConfig.register(FeatureEncoderConfig.model_type, FeatureEncoderConfig, exist_ok=True)
AutoModel.register(FeatureEncoderConfig, FeatureEncoderForClassification, exist_ok=True)
