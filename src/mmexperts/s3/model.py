"""The S3 tuner: wraps each tower's token block, then runs the paper design's MoE encoders (or the concept experts)
after the model runs, and attaches routing, representations, logits and the stage's loss."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.utils import ModelOutput

from ..errors import ConfigError
from ..towers import masked_mean
from ..tuners import MODALITIES, TwoTowerTuner
from .config import S3Config
from .layer import S3Layer, S3Output
from .paper import PaperOutput, routing_aux_loss, selection_losses, specialization_losses, weighted_stage_loss
from .pruning import ExpertPruning, without_s3_inputs

HEAD_NAMES = ("classifier",)
OUTPUT_KEYS = {"concept_embeds": "concept_embeds", "fused_embeds": "fused_embeds", "routing_weights": "routing_weights",
               "concept_assignments": "assignments"}  # output field: S3Output attribute


@dataclass
class S3FeatureOutput(ModelOutput):
    """What :meth:`S3Model.connect` returns: ``loss`` and ``logits`` as the PeftModel's forward gives them, and every
    other field S3 adds to that output (``aux_loss``, ``routing_weights``, ``fused_embeds``..., per design and stage)
    as items and attributes; the base model's own fields (its pooled tower embeddings) are not computed."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class S3Model(ExpertPruning, TwoTowerTuner):
    """PEFT tuner for S3; see :class:`~mmexperts.S3Config`.

    Paper design: outputs gain ``fused_embeds`` (batch, 2d; the pooled vision and text embeddings side by side, what a
    linear probe reads), ``modality_embeds`` (batch, 2, d), ``routing_weights`` (2 * num_layers, batch, N; per example
    the mean over real tokens of the kept token routing weights, the vision tower's layers first),
    ``token_routing_weights`` (num_layers, batch, vision tokens + text tokens, N; the kept (token, expert) pairs, zero
    elsewhere and on padding), ``aux_loss`` (weighted balance + z-loss; zero in the selection stage) and, with a head,
    ``logits`` of the linear probe head on the detached ``fused_embeds``. ``loss`` = probe cross-entropy (with labels)
    + ``aux_loss`` + ``stage_loss``: in the ``"specialization"`` stage (training only: it draws augmented views)
    ``rep_loss`` and ``dsc_loss``; in the ``"selection"`` stage (whenever labels are given) ``supcon_loss`` and
    ``compactness_loss``, each field also in the output. Stage and keep ratio: :meth:`set_stage`,
    :meth:`set_keep_ratio`; Selection trains :meth:`selection_parameters` only.

    Concepts design: outputs gain ``concept_embeds`` (batch, K, d_e; zero for pruned or unselected experts),
    ``fused_embeds`` (batch, d_e; the gate-weighted sum of concepts), ``routing_weights`` (1, batch, K; one routing
    site, as the shared (sites, batch, K) convention), ``concept_assignments`` (batch, tokens, K; token-to-concept
    weights over the vision then the text tower's tokens, zero on padding), ``aux_loss`` (weighted sum of the
    auxiliary losses) and, with a head, ``logits`` from S3's task heads (replacing the base head's) and ``loss`` =
    task loss + ``aux_loss`` (+ weighted ``ssl_loss`` in training). ``task_ids`` (batch,) may be passed to the forward
    call of multi-task adapters; it is consumed here and never reaches the base model.
    """

    prefix: str = "s3_"
    method_name = "S3"
    tuner_layer_cls = S3Layer
    target_module_mapping: dict = {}

    # ---- injection ---------------------------------------------------------------------------------------------
    def _token_block(self, modality: str, config: S3Config) -> str:
        names = self.towers[modality].block_names
        if not -len(names) <= config.token_layer < len(names):
            raise ConfigError("token_layer", f"token_layer must index one of the {len(names)} blocks of the "
                              f"{modality} tower, got {config.token_layer}.")
        return names[config.token_layer]

    def _prepare_adapter_config(self, peft_config: S3Config, model_config: dict) -> S3Config:
        self._record_tower_sizes(peft_config)
        if peft_config.target_modules is None:
            peft_config.target_modules = [self._token_block(m, peft_config) for m in MODALITIES]
        if peft_config.num_labels is None:
            has_head = any(isinstance(getattr(self.model, name, None), nn.Module) for name in HEAD_NAMES)
            peft_config.num_labels = int(self.model.config.num_labels) if has_head else 0
        if peft_config.ssl_loss_weight is None:  # without a head, the self-supervised loss is what trains the experts
            peft_config.ssl_loss_weight = 0.0 if peft_config.num_labels else 1.0
        return peft_config

    def estimated_parameters(self, peft_config: S3Config) -> int:
        c = peft_config
        if c.design == "paper":
            d, n, h = c.latent_size, c.num_experts, c.mlp_hidden_size
            block = 4 * d + 4 * d * (d + 1) + d * n + n * ((d + 1) * h + (h + 1) * d)
            towers = sum((self.towers[m].hidden_size + 1) * d + 2 * self.towers[m].hidden_size for m in MODALITIES)
            return towers + 2 * (c.num_layers * block + 2 * d) + (2 * d + 1) * (c.num_labels or 0)
        d, k, e = c.latent_size, c.num_experts, c.concept_size
        projections = sum((self.towers[m].hidden_size + 2) * d + 2 * self.towers[m].hidden_size for m in MODALITIES)
        experts = k * ((d + 1) * c.mlp_hidden_size + (c.mlp_hidden_size + 1) * e)
        heads = c.num_tasks * ((k * e if c.head_input == "concat" else e) + 1) * (c.num_labels or 0)
        router = c.num_tasks * c.task_embedding_size + (d + c.task_embedding_size) * k
        return projections + k * d + experts + router + heads

    def _create_and_replace(self, peft_config: S3Config, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: str | None = None) -> None:
        blocks = {self._token_block(m, peft_config): m for m in MODALITIES}
        modality = blocks.get(current_key)
        if modality is None:
            raise ValueError(f"S3 attaches to the towers' token blocks {sorted(blocks)}; target_modules also matched "
                             f"{current_key!r}. Leave target_modules unset.")
        owns_core = modality == "vision"
        if isinstance(target, S3Layer):
            target.update_layer(adapter_name, peft_config, owns_core, peft_config.num_labels)
            return
        new_module = S3Layer(target, self.context, modality, self.towers[modality].hidden_size)
        new_module.update_layer(adapter_name, peft_config, owns_core, peft_config.num_labels)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ---- forward -----------------------------------------------------------------------------------------------
    def _layers(self) -> dict[str, S3Layer]:
        return {layer.modality: layer for layer in self.tuner_layers()}

    def call_hooks(self, inputs: dict, adapter_names: list[str]):
        configs = [self.peft_config[name] for name in adapter_names]
        takes_labels = any(c.num_labels or c.stage == "selection" for c in configs)
        return without_s3_inputs(self.model, ("task_ids", "labels") if takes_labels else ("task_ids",))

    # ---- the paper design's stages -------------------------------------------------------------------------------
    def _paper_config(self, adapter_name: str | None, what: str) -> tuple[str, S3Config]:
        name = self.single_adapter(adapter_name)
        config = self.peft_config[name]
        if config.design != "paper":
            raise ValueError(f"{what} belongs to S3's paper design, but adapter {name!r} has design="
                             f"{config.design!r}; the concepts design sparsifies through its expert mask (prune, "
                             "set_expert_mask) and fine-tunes router_and_head_parameters().")
        return name, config

    def _set_checked(self, adapter_name: str | None, what: str, field_name: str, value) -> None:
        name, config = self._paper_config(adapter_name, what)
        trial = copy.copy(config)
        setattr(trial, field_name, value)
        trial.__post_init__()  # the config's own checks (ConfigError naming the field)
        setattr(config, field_name, getattr(trial, field_name))

    def set_keep_ratio(self, keep_ratio: float, adapter_name: str | None = None) -> None:
        """Stage 3, Sparsification: keep the top ``keep_ratio`` of each batch's (token, expert) routing pairs per MoE
        layer (1.0: all). Changes no weight; stored in the config, so it is saved with the adapter."""
        self._set_checked(adapter_name, "set_keep_ratio", "keep_ratio", keep_ratio)

    def set_stage(self, stage: str, adapter_name: str | None = None) -> None:
        """Choose the loss: ``"specialization"`` (stage 1, self-supervised) or ``"selection"`` (stage 2, labels)."""
        self._set_checked(adapter_name, "set_stage", "stage", stage)

    def selection_parameters(self, adapter_name: str | None = None) -> list[nn.Parameter]:
        """Stage 2 trains these only: the routers of every MoE layer of both modalities."""
        name, _ = self._paper_config(adapter_name, "selection_parameters")
        return [p for layer in self._layers().values() for p in layer.s3_encoder[name].router_parameters()]

    def compute_paper(self, adapter_name: str) -> PaperOutput:
        """The paper design over the tokens recorded in the current call, for one adapter."""
        config, layers, context = self.peft_config[adapter_name], self._layers(), self.context
        tokens = {m: (layers[m].project(adapter_name, context.tokens[m][0]), context.tokens[m][1]) for m in MODALITIES}

        def encode(modality, latent, mask):
            return layers[modality].s3_encoder[adapter_name](latent, mask, config.keep_ratio)

        encoded = {m: encode(m, *tokens[m]) for m in MODALITIES}
        clean = {m: encoded[m].pooled for m in MODALITIES}
        fused = torch.cat(list(clean.values()), -1)
        real = {m: tokens[m][1] for m in MODALITIES}
        routing = torch.stack([masked_mean(w, real[m]) for m in MODALITIES for w in encoded[m].weights])
        token_routing = torch.stack([torch.cat(pair, 1) for pair in zip(*(encoded[m].weights for m in MODALITIES))])
        selection = config.stage == "selection"
        aux = fused.new_zeros(()) if selection else routing_aux_loss(list(encoded.values()), config)
        labels = context.inputs.get("labels")
        head = layers["vision"].s3_head
        logits = head[adapter_name](fused.detach()) if adapter_name in head else None
        losses = {}
        if selection and labels is not None:
            losses = selection_losses(clean, torch.as_tensor(labels, device=fused.device), config)
        elif selection and self.model.training:
            raise ValueError("The selection stage trains the routers with labels: pass labels=... (one class id per "
                             "example) to the forward call, or set_stage('specialization').")
        elif not selection and self.model.training:
            losses = specialization_losses(encode, tokens, clean, config)
        stage_loss = weighted_stage_loss(losses, config) if losses else None
        return PaperOutput(fused, torch.stack(list(clean.values()), 1), routing, token_routing, aux, logits, losses,
                           stage_loss)

    def compute(self, adapter_name: str) -> S3Output | PaperOutput | None:
        """S3 over the tokens recorded in the current call, for one adapter (None if a tower did not run)."""
        context, layers = self.context, self._layers()
        if any(m not in context.tokens for m in MODALITIES):
            return None
        if self.peft_config[adapter_name].design == "paper":
            return self.compute_paper(adapter_name)
        tokens = torch.cat([layers[m].project(adapter_name, context.tokens[m][0]) for m in MODALITIES], 1)
        mask = torch.cat([context.tokens[m][1] for m in MODALITIES], 1)
        core = layers["vision"]
        return core.s3_core[adapter_name](tokens, mask, core.s3_expert_mask[adapter_name],
                                          context.inputs.get("task_ids"))

    # ---- training from cached tower features ------------------------------------------------------------------------
    def feature_signature(self) -> dict:
        """What :meth:`tower_tokens` extracts, for the key of a feature cache: a cache of another method (or another
        token layer) is never read for this adapter."""
        config = self.peft_config[self.single_adapter()]
        return {"method": "s3", "tokens": "output of the token block",
                "token_layer": {m: self._token_block(m, config) for m in MODALITIES}}

    def tower_tokens(self, modality: str, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one frozen tower alone on its inputs (``pixel_values``, or ``input_ids`` and ``attention_mask``...) and
        return what the S3 layer records at its token block, i.e. what :meth:`compute` reads: the tokens (batch,
        length, hidden size) and the boolean mask of the real ones. S3 itself is not computed; call it in eval mode
        under ``torch.no_grad()`` to cache features."""
        self.single_adapter()
        tower = self.towers[modality]
        tower_inputs = tower.select_inputs(inputs)
        if not tower_inputs:
            raise ValueError(f"The batch has none of the {modality} tower's inputs {list(tower.input_names)}.")
        with self.calling(inputs) as context:
            tower.module(**tower_inputs)
            if modality not in context.tokens:
                raise ValueError(f"No S3 layer recorded the {modality} tower's tokens: the adapter is disabled or not "
                                 "active; activate it (model.set_adapter(name)) before computing tower tokens.")
            return context.tokens[modality]

    def check_connect(self) -> list[str]:
        """The active adapters :meth:`connect` computes; refuses adapters without S3's own heads (``num_labels`` 0)."""
        names = self.active_adapter_names()
        if not names:
            raise ValueError("No S3 adapter is active (inside disable_adapter()?); connect computes the active ones.")
        headless = [name for name in names if not self.peft_config[name].num_labels]
        if headless:
            raise ConfigError("num_labels", f"S3 adapter(s) {headless} have no head of their own (num_labels=0), so "
                              "their logits would come from the base model's classifier, which reads the towers' "
                              "full outputs, not the cached token features. To train S3 from cached features, create "
                              "the adapter on a classifier base (or with S3Config(num_labels=...)); else run the "
                              "towers (drop --cache_features).")
        return names

    def connect(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None, text_tokens: torch.Tensor,
                text_mask: torch.Tensor | None, labels: torch.Tensor | None = None,
                task_ids: torch.Tensor | None = None, return_loss: bool = True) -> S3FeatureOutput:
        """S3 (its active adapters, with their heads) on token features as :meth:`tower_tokens` gives them (or a
        feature cache stores them): the logits, loss and fields of the PeftModel's forward on the batch they came
        from. Masks mark the real tokens (None: all real). Needs adapters with S3's own heads (``num_labels`` > 0):
        without them the logits would come from the base model's head, which sits on the towers' full outputs."""
        names = self.check_connect()
        tokens = {}
        for modality, name, value, mask in (("vision", "image_tokens", image_tokens, image_mask),
                                            ("text", "text_tokens", text_tokens, text_mask)):
            expected = self.towers[modality].hidden_size
            if value.dim() != 3 or value.shape[-1] != expected:
                raise ValueError(f"{name} must have shape (batch, length, {expected}) for this adapter's {modality} "
                                 f"tower, got {tuple(value.shape)}; compute the features with the same backbone the "
                                 "adapter was built on.")
            if mask is None:
                mask = torch.ones(value.shape[:2], dtype=torch.bool, device=value.device)
            elif tuple(mask.shape) != tuple(value.shape[:2]):
                raise ValueError(f"The {modality} mask has shape {tuple(mask.shape)} but {name} has "
                                 f"{tuple(value.shape[:2])} tokens; pass one mask entry per token.")
            tokens[modality] = (value, mask.bool())
        if image_tokens.shape[0] != text_tokens.shape[0]:
            raise ValueError(f"image_tokens hold {image_tokens.shape[0]} examples but text_tokens "
                             f"{text_tokens.shape[0]}; pass one image and one text per example.")
        inputs = {key: value for key, value in (("labels", labels), ("task_ids", task_ids)) if value is not None}
        with self.calling(inputs) as context:
            context.tokens.update(tokens)
            fields, loss = self.call_fields(names, None)
        out = S3FeatureOutput(loss=loss if return_loss else None, logits=fields.pop("logits", None))
        for key, value in fields.items():
            out[key] = value
        return out

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task loss with transformers' semantics for the base model's ``problem_type``."""
        config = SimpleNamespace(num_labels=logits.shape[-1],
                                 problem_type=getattr(self.model.config, "problem_type", None))
        return ForSequenceClassificationLoss(labels.to(logits.device), logits, config)

    def _fields_and_loss(self, name: str, result: S3Output | PaperOutput) -> tuple[dict, torch.Tensor | None]:
        """One adapter's output fields and the loss it adds besides ``aux_loss`` and the task loss."""
        if isinstance(result, PaperOutput):
            return result.fields(), result.stage_loss
        fields = {key: getattr(result, attribute) for key, attribute in OUTPUT_KEYS.items()}
        fields["routing_weights"] = fields["routing_weights"][None]
        if result.ssl_loss is None:
            return fields, None
        return {**fields, "ssl_loss": result.ssl_loss}, self.peft_config[name].ssl_loss_weight * result.ssl_loss

    def call_outputs(self, adapter_names: list[str], base_loss):
        results = {name: result for name in adapter_names if (result := self.compute(name)) is not None}
        if not results:
            return {}, None
        single = len(results) == 1
        per_adapter = {name: self._fields_and_loss(name, result) for name, result in results.items()}
        fields = {}
        for key in dict.fromkeys(key for adapter_fields, _ in per_adapter.values() for key in adapter_fields):
            values = {name: f[key] for name, (f, _) in per_adapter.items() if key in f}
            fields[key] = next(iter(values.values())) if single else values
        aux = sum(result.aux_loss for result in results.values())
        fields["aux_loss"] = aux
        extra = aux
        ssl = [loss for _, loss in per_adapter.values() if loss is not None]
        if ssl:
            extra = extra + sum(ssl)
        heads = [result.logits for result in results.values() if result.logits is not None]
        labels = self.context.inputs.get("labels")
        if heads:
            fields["logits"] = sum(heads)
            if labels is not None:
                return fields, self.task_loss(fields["logits"], labels) + extra
        if base_loss is not None:
            return fields, base_loss + extra.to(base_loss.dtype)
        return fields, extra if ssl else None  # a stage's loss without labels (or without a head)
