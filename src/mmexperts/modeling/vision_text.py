"""``VisionTextModelForClassification``: two frozen-able ``AutoModel`` towers and a classification head."""

from __future__ import annotations

import inspect
from functools import cached_property

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.loss.loss_utils import ForSequenceClassificationLoss

from ..towers import find_towers
from .outputs import VisionTextClassifierOutput

CLASSIFIER_INPUTS = ("concat", "vision", "text")


@strict
class VisionTextClassificationConfig(PreTrainedConfig):
    """Config of :class:`VisionTextModelForClassification`: the two towers' configs and the head.

    ``classifier_input`` chooses the features the head reads: both pooled towers concatenated (late fusion), or one
    tower only (as MoPE does with its prompted tower). ``num_labels`` and ``problem_type`` keep transformers'
    semantics: regression, single-label or multi-label classification.
    """

    model_type = "vision-text-classification"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    classifier_input: str = "concat"
    classifier_dropout: float = 0.0

    def validate_classifier_input(self):
        if self.classifier_input not in CLASSIFIER_INPUTS:
            raise ValueError(f"classifier_input must be one of {CLASSIFIER_INPUTS}, got {self.classifier_input!r}.")

    @classmethod
    def from_vision_text_configs(cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs):
        """Build the config from the two towers' configs."""
        return cls(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), **kwargs)


class VisionTextModelForClassification(PreTrainedModel):
    """A vision tower and a text tower (any ``AutoModel``), pooled, and a linear head over their features."""

    config_class = VisionTextClassificationConfig
    config: VisionTextClassificationConfig
    base_model_prefix = "vision_text"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: VisionTextClassificationConfig, vision_model: PreTrainedModel | None = None,
                 text_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        self.text_model = text_model if text_model is not None else AutoModel.from_config(config.text_config)
        for tower, tower_config in ((self.vision_model, config.vision_config), (self.text_model, config.text_config)):
            # the tower keeps the attention implementation it was built with: a sub-config rebuilt from a dict names
            # none, and BERT-style towers then build no attention mask at all (padding would be attended to)
            tower_config._attn_implementation_internal = tower.config._attn_implementation
            tower.config = tower_config
        sizes = {"vision": config.vision_config.hidden_size, "text": config.text_config.hidden_size}
        in_features = sum(sizes.values()) if config.classifier_input == "concat" else sizes[config.classifier_input]
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(in_features, config.num_labels)
        self.post_init()

    @classmethod
    def from_vision_text_configs(cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs):
        """A randomly initialised model from the two towers' configs; ``kwargs`` go to the config
        (``num_labels``...)."""
        return cls(VisionTextClassificationConfig.from_vision_text_configs(vision_config, text_config, **kwargs))

    @classmethod
    def from_vision_text_pretrained(cls, vision_model_name_or_path: str, text_model_name_or_path: str,
                                    **kwargs) -> "VisionTextModelForClassification":
        """Pretrained towers from the Hub or local folders, with a new head.

        ``vision_*`` / ``text_*`` keyword arguments go to each tower's ``AutoModel.from_pretrained`` (e.g.
        ``vision_revision``); the rest (``num_labels``, ``problem_type``, ``classifier_input``) go to the config.
        """
        tower_kwargs = {"vision": {}, "text": {}}
        for key in [k for k in kwargs if k.startswith(("vision_", "text_"))]:
            modality, _, name = key.partition("_")
            tower_kwargs[modality][name] = kwargs.pop(key)
        vision_model = AutoModel.from_pretrained(vision_model_name_or_path, **tower_kwargs["vision"])
        text_model = AutoModel.from_pretrained(text_model_name_or_path, **tower_kwargs["text"])
        config = VisionTextClassificationConfig.from_vision_text_configs(vision_model.config, text_model.config,
                                                                         **kwargs)
        return cls(config, vision_model=vision_model, text_model=text_model)

    @cached_property
    def towers(self) -> dict:
        """The vision and text towers (how each takes its inputs and pools its summary), found once."""
        return find_towers(self)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, return_loss: bool | None = None,
                num_items_in_batch: torch.Tensor | int | None = None, **kwargs) -> VisionTextClassifierOutput | tuple:
        """Pool both towers and classify.

        Other keyword arguments go to the tower whose ``forward`` names them: ``interpolate_pos_encoding=True`` to the
        vision tower (images of another size than its config's), e.g. ``inputs_embeds`` to a BERT text tower; a name
        both towers take goes to both. Unknown ones are refused (``None`` values are ignored). ``return_loss`` is
        accepted for adapters that add a loss of their own (Alt-MoE): the head's loss is computed whenever ``labels``
        are given. ``num_items_in_batch`` (from transformers' ``Trainer``) makes the single-label loss a sum over the
        batch divided by it (correct under gradient accumulation) and rescales the other losses alike.
        """
        if pixel_values is None or input_ids is None:
            missing = [n for n, v in (("pixel_values", pixel_values), ("input_ids", input_ids)) if v is None]
            raise ValueError(f"VisionTextModelForClassification needs both modalities; missing {missing}.")
        towers = self.towers
        tower_kwargs = self._route_tower_kwargs(kwargs)
        text_inputs = towers["text"].select_inputs({"input_ids": input_ids, "attention_mask": attention_mask,
                                                    "token_type_ids": token_type_ids, "position_ids": position_ids})
        vision_embeds = towers["vision"].pool(self.vision_model(pixel_values=pixel_values, **tower_kwargs["vision"]))
        text_embeds = towers["text"].pool(self.text_model(**text_inputs, **tower_kwargs["text"]))
        features = {"vision": vision_embeds, "text": text_embeds,
                    "concat": torch.cat([vision_embeds, text_embeds], -1)}[self.config.classifier_input]
        logits = self.classifier(self.dropout(features))
        loss = self._loss(labels, logits, num_items_in_batch) if labels is not None else None
        output = VisionTextClassifierOutput(loss=loss, logits=logits, vision_embeds=vision_embeds,
                                            text_embeds=text_embeds)
        return output if return_dict is not False else output.to_tuple()

    @cached_property
    def tower_keywords(self) -> dict[str, tuple[str, ...]]:
        """Per tower, the keyword arguments its ``forward`` names that this model's ``forward`` routes to it."""
        own = set(inspect.signature(type(self).forward).parameters)
        names = {}
        for modality, module in (("vision", self.vision_model), ("text", self.text_model)):
            parameters = inspect.signature(type(module).forward).parameters.values()
            names[modality] = tuple(p.name for p in parameters if p.name not in own and p.name != "self"
                                    and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        return names

    def _route_tower_kwargs(self, kwargs: dict) -> dict[str, dict]:
        keywords = self.tower_keywords
        routed = {modality: {k: v for k, v in kwargs.items() if k in names and v is not None}
                  for modality, names in keywords.items()}
        unknown = sorted(k for k, v in kwargs.items() if v is not None and not any(k in n for n in keywords.values()))
        if unknown:
            raise TypeError(
                f"VisionTextModelForClassification.forward got unexpected keyword arguments {unknown}. It takes "
                "pixel_values, input_ids, attention_mask, token_type_ids, position_ids, labels, return_dict, "
                f"return_loss, num_items_in_batch, the vision tower's {list(keywords['vision'])} and the text tower's "
                f"{list(keywords['text'])} ({type(self.vision_model).__name__} / {type(self.text_model).__name__}).")
        return routed

    def _loss(self, labels: torch.Tensor, logits: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        if num_items_in_batch is None:
            return ForSequenceClassificationLoss(labels, logits, self.config)
        loss = ForSequenceClassificationLoss(labels, logits, self.config, num_items_in_batch=num_items_in_batch)
        if self.config.problem_type == "single_label_classification":
            return loss  # summed over the batch and divided by num_items_in_batch
        if torch.is_tensor(num_items_in_batch):  # regression and multi-label losses are means over every label
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss * labels.numel() / num_items_in_batch


AutoConfig.register(VisionTextClassificationConfig.model_type, VisionTextClassificationConfig, exist_ok=True)
AutoModel.register(VisionTextClassificationConfig, VisionTextModelForClassification, exist_ok=True)
