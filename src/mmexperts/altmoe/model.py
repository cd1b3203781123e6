"""The Alt-MoE tuner: taps both towers' token features, runs the connector and rewrites the CLIP-style outputs."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import info_nce
from ..towers import masked_mean
from ..tuners import MODALITIES, TwoTowerTuner
from .config import DIRECTIONS, RENAMED_DIRECTIONS, AltMoEConfig
from .layer import BRANCHES, SOURCE, TARGET, AltMoEConnector, AltMoELayer, check_direction
from .outputs import AltMoEOutput, TokenFeatures, regression_loss, tap_last_block

ALIGNED_KEYS = ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text")


class AltMoEModel(TwoTowerTuner):
    """PEFT tuner for Alt-MoE; see :class:`~mmexperts.AltMoEConfig`.

    The training direction is state of the tuner, not a forward argument: ``with model.base_model.direction(
    "vision_to_text"): model(...)`` computes (and trains) one direction; ``None`` (the default) runs both.
    """

    prefix: str = "altmoe_"
    method_name = "Alt-MoE"
    tuner_layer_cls = AltMoELayer
    directions = DIRECTIONS
    renamed_key_parts = RENAMED_DIRECTIONS
    target_module_mapping: dict = {}

    @property
    def active_direction(self) -> str | None:
        """The direction forward calls compute: 'vision_to_text', 'text_to_vision' or None (both)."""
        return self.__dict__.get("_active_direction")

    @active_direction.setter
    def active_direction(self, direction: str | None) -> None:
        self.__dict__["_active_direction"] = None if direction is None else check_direction(direction)

    @contextmanager
    def direction(self, direction: str | None):
        """Compute only ``direction`` (None: both) inside the block; the previous setting is restored after."""
        previous = self.active_direction
        self.active_direction = direction
        try:
            yield
        finally:
            self.active_direction = previous

    # ---- injection ---------------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: AltMoEConfig, model_config: dict) -> AltMoEConfig:
        towers = self.towers
        self._record_tower_sizes(peft_config)
        if peft_config.target_modules is None:
            peft_config.target_modules = [towers["text"].block_names[-1]]
        return peft_config

    def estimated_parameters(self, peft_config: AltMoEConfig) -> int:
        c = peft_config
        width, inner = c.hidden_size, c.expert_hidden_size or c.hidden_size
        towers = sum(self.towers[m].hidden_size for m in MODALITIES)
        experts = c.num_experts * ((width + 1) * inner + (inner + 1) * width)
        return 3 * towers * (width + 1) + experts + (width + 1) * c.num_experts + 2 * width * (width + 4)

    def _create_and_replace(self, peft_config: AltMoEConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: str | None = None) -> None:
        if isinstance(target, AltMoELayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = AltMoELayer(target, self.context, peft_config.vision_hidden_size, peft_config.text_hidden_size)
        new_module.update_layer(adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


    # ---- the connector -----------------------------------------------------------------------------------------
    def _host(self) -> AltMoELayer:
        hosts = [m for m in self.model.modules() if isinstance(m, AltMoELayer)]
        if len(hosts) != 1:
            raise RuntimeError(f"Expected one Alt-MoE host layer in the model, found {len(hosts)}.")
        return hosts[0]

    def connector(self, adapter_name: str | None = None) -> AltMoEConnector:
        """The connector of ``adapter_name`` (default: the single active adapter)."""
        return self._host().altmoe_connector[self.single_adapter(adapter_name)]

    def direction_parameters(self, direction: str) -> list[nn.Parameter]:
        """Parameters of the active connector that only ``direction`` uses."""
        return self.connector().direction_parameters(direction)

    def connect(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None, text_tokens: torch.Tensor,
                text_mask: torch.Tensor | None, return_loss: bool = False) -> AltMoEOutput:
        """Run the active connector on token features (as cached by :mod:`mmexperts.altmoe.features`, or tapped from
        the towers): ``image_tokens`` (batch, patches, vision size), ``text_tokens`` (batch, length, text size) and
        masks of their real tokens (None: all real)."""
        config = self.peft_config[self.active_adapters[0]]
        connector = self.connector()
        tokens = {"vision": image_tokens, "text": text_tokens}
        masks = {"vision": image_mask, "text": text_mask}
        for modality, name in (("vision", "image_tokens"), ("text", "text_tokens")):
            value, expected = tokens[modality], connector.sizes[modality]
            if value.dim() != 3 or value.shape[-1] != expected:
                raise ValueError(f"{name} must have shape (batch, length, {expected}) for this adapter's "
                                 f"{modality} tower, got {tuple(value.shape)}; compute the features with the same "
                                 "backbone the adapter was built on.")
            if masks[modality] is None:
                masks[modality] = value.new_ones(value.shape[:2], dtype=torch.long)
            elif tuple(masks[modality].shape) != tuple(value.shape[:2]):
                raise ValueError(f"The {modality} mask has shape {tuple(masks[modality].shape)} but {name} has "
                                 f"{tuple(value.shape[:2])} tokens; pass one mask entry per token.")
        if image_tokens.shape[0] != text_tokens.shape[0]:
            raise ValueError(f"image_tokens hold {image_tokens.shape[0]} examples but text_tokens "
                             f"{text_tokens.shape[0]}; pass aligned image-text pairs.")
        dtype = connector.target_projections["vision"].weight.dtype
        tokens = {m: t.to(dtype) for m, t in tokens.items()}
        pooled = {m: masked_mean(tokens[m], masks[m]) for m in MODALITIES}
        targets = {m: connector.target(m, pooled[m]) for m in MODALITIES}
        directions = DIRECTIONS if self.active_direction is None else (self.active_direction,)
        predictions = {d: connector.predict(d, tokens[SOURCE[d]], masks[SOURCE[d]]) for d in directions}
        out = AltMoEOutput(vision_target_embeds=targets["vision"], text_target_embeds=targets["text"], **predictions)
        out.aux_loss = torch.stack([p.balance_loss for p in predictions.values()]).mean()
        out.routing_weights = torch.stack([p.example_routing[b] for p in predictions.values() for b in BRANCHES])
        if len(directions) == len(DIRECTIONS):
            half = 0.5 ** 0.5
            out.image_embeds = torch.cat([F.normalize(predictions["vision_to_text"].embeds, dim=-1),
                                          F.normalize(targets["vision"], dim=-1)], -1) * half
            out.text_embeds = torch.cat([F.normalize(targets["text"], dim=-1),
                                         F.normalize(predictions["text_to_vision"].embeds, dim=-1)], -1) * half
            out.logits_per_text = out.text_embeds @ out.image_embeds.T / config.temperature
            out.logits_per_image = out.logits_per_text.T
        if return_loss:
            losses = [config.alpha * regression_loss(p.latent, pooled[TARGET[d]], config.regression_loss)
                      + (1 - config.alpha) * info_nce(p.embeds, targets[TARGET[d]], config.temperature)
                      for d, p in predictions.items()]
            out.loss = torch.stack(losses).sum() + config.load_balance_loss_weight * out.aux_loss
        return out

    def token_features(self, **inputs) -> TokenFeatures:
        """Run the two frozen towers alone on a batch (``pixel_values``, ``input_ids``, ``attention_mask``...) and
        return their token features: what the connector reads, and what a feature cache stores."""
        self._check_pairs(inputs)
        image, image_mask = self.tower_tokens("vision", **inputs)
        text, text_mask = self.tower_tokens("text", **inputs)
        return TokenFeatures(image, image_mask, text, text_mask)

    def feature_signature(self) -> dict:
        """What :meth:`tower_tokens` extracts, for the key of a feature cache (a cache of another method's features is
        never read for this adapter)."""
        return {"method": "altmoe", "tokens": "mean of the last two hidden layers"}

    def tower_tokens(self, modality: str, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one frozen tower alone on its inputs; return its token features (mean of its last two hidden layers)
        and the mask of the real tokens (the tower's attention mask where it takes one, as text towers do; else all
        ones)."""
        tower = self.towers[modality]
        tower_inputs = tower.select_inputs(inputs)
        if not tower_inputs:
            raise ValueError(f"The batch has none of the {modality} tower's inputs {list(tower.input_names)}.")
        captured = {}
        with self.calling(inputs), tap_last_block(tower, lambda value: captured.__setitem__(modality, value)):
            tower.module(**tower_inputs)
        tokens = captured[modality]
        mask = tower_inputs.get("attention_mask")
        if mask is None or mask.shape[1] != tokens.shape[1]:
            mask = tokens.new_ones(tokens.shape[:2], dtype=torch.long)
        return tokens, mask

    def _check_pairs(self, inputs: dict) -> None:
        """Refuse image and text batches of different sizes before the towers run (the loss needs one pair per row)."""
        sizes = {}
        for modality in MODALITIES:
            for name, value in self.towers[modality].select_inputs(inputs).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    sizes[modality] = (name, value.shape[0])
                    break
        if len(sizes) == len(MODALITIES) and sizes["vision"][1] != sizes["text"][1]:
            (image_name, images), (text_name, texts) = sizes["vision"], sizes["text"]
            raise ValueError(f"{image_name} has batch size {images} but {text_name} has {texts}; Alt-MoE pairs row i "
                             "of the images with row i of the texts: pass one caption per image (or repeat each image "
                             "once per caption).")

    def _features(self, captured: dict, inputs: dict) -> TokenFeatures:
        image, text = captured["vision"], captured["text"]
        text_mask = inputs.get("attention_mask")
        if text_mask is None or text_mask.shape[1] != text.shape[1]:
            text_mask = text.new_ones(text.shape[:2], dtype=torch.long)
        return TokenFeatures(image, image.new_ones(image.shape[:2], dtype=torch.long), text, text_mask)

    # ---- forward plumbing ----------------------------------------------------------------------------------------
    @contextmanager
    def call_hooks(self, inputs: dict, adapter_names: list[str]):
        """Tap both towers' last blocks into the call context."""
        self._check_pairs(inputs)
        tokens = self.context.tokens
        with tap_last_block(self.towers["vision"], lambda value: tokens.__setitem__("vision", value)), \
                tap_last_block(self.towers["text"], lambda value: tokens.__setitem__("text", value)):
            yield

    def call_outputs(self, adapter_names: list[str], base_loss):
        context = self.context
        if set(context.tokens) != set(MODALITIES):
            raise ValueError("Alt-MoE needs both towers to run: call the model with pixel_values and input_ids (and "
                             "attention_mask for padded text).")
        features = self._features(context.tokens, context.inputs)
        result = self.connect(features.image_tokens, features.image_mask, features.text_tokens, features.text_mask,
                              return_loss=bool(context.inputs.get("return_loss")))
        fields = dict(result.items())
        fields.update({key: None for key in ALIGNED_KEYS if result.get(key) is None})  # one direction: no aligned pair
        return fields, fields.pop("loss", None)
