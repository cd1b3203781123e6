"""The S3 tuner: wraps each tower's token block, then computes concepts, routing and logits after the model runs."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers.loss.loss_utils import ForSequenceClassificationLoss

from ..errors import ConfigError
from ..tuners import MODALITIES, TwoTowerTuner
from .config import S3Config
from .layer import S3Layer, S3Output
from .pruning import ExpertPruning, without_s3_inputs

HEAD_NAMES = ("classifier",)
OUTPUT_KEYS = {"concept_embeds": "concept_embeds", "fused_embeds": "fused_embeds", "routing_weights": "routing_weights",
               "concept_assignments": "assignments"}  # output field: S3Output attribute


class S3Model(ExpertPruning, TwoTowerTuner):
    """PEFT tuner for S3; see :class:`~mmexperts.S3Config`.

    Outputs gain ``concept_embeds`` (batch, K, d_e; zero for pruned or unselected experts), ``fused_embeds`` (batch,
    d_e; the gate-weighted sum of concepts), ``routing_weights`` (1, batch, K; one routing site, as the shared
    (sites, batch, K) convention), ``concept_assignments`` (batch, tokens, K; token-to-concept weights over the
    vision then the text tower's tokens, zero on padding), ``aux_loss`` (weighted sum of the auxiliary losses) and,
    with a head, ``logits`` from S3's task heads (replacing the base head's) and ``loss`` = task loss + ``aux_loss``
    (+ weighted ``ssl_loss`` in training). ``task_ids`` (batch,) may be passed to the forward call of multi-task
    adapters; it is consumed here and never reaches the base model.
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
        d, k, e = c.latent_dim, c.num_experts, c.concept_dim
        projections = sum((self.towers[m].hidden_size + 2) * d + 2 * self.towers[m].hidden_size for m in MODALITIES)
        experts = k * ((d + 1) * c.hidden_dim + (c.hidden_dim + 1) * e)
        heads = c.num_tasks * ((k * e if c.head_input == "concat" else e) + 1) * (c.num_labels or 0)
        router = c.num_tasks * c.task_embedding_dim + (d + c.task_embedding_dim) * k
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
        with_heads = any(self.peft_config[name].num_labels for name in adapter_names)
        return without_s3_inputs(self.model, ("task_ids", "labels") if with_heads else ("task_ids",))

    def compute(self, adapter_name: str) -> S3Output | None:
        """S3 over the tokens recorded in the current call, for one adapter (None if a tower did not run)."""
        context, layers = self.context, self._layers()
        if any(m not in context.tokens for m in MODALITIES):
            return None
        tokens = torch.cat([layers[m].project(adapter_name, context.tokens[m][0]) for m in MODALITIES], 1)
        mask = torch.cat([context.tokens[m][1] for m in MODALITIES], 1)
        core = layers["vision"]
        return core.s3_core[adapter_name](tokens, mask, core.s3_expert_mask[adapter_name],
                                          context.inputs.get("task_ids"))

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task loss with transformers' semantics for the base model's ``problem_type``."""
        config = SimpleNamespace(num_labels=logits.shape[-1],
                                 problem_type=getattr(self.model.config, "problem_type", None))
        return ForSequenceClassificationLoss(labels.to(logits.device), logits, config)

    def call_outputs(self, adapter_names: list[str], base_loss):
        results = {name: result for name in adapter_names if (result := self.compute(name)) is not None}
        if not results:
            return {}, None
        single = len(results) == 1
        fields = {}
        for key, attribute in OUTPUT_KEYS.items():
            values = {name: getattr(result, attribute) for name, result in results.items()}
            if key == "routing_weights":
                values = {name: value[None] for name, value in values.items()}
            fields[key] = next(iter(values.values())) if single else values
        aux = sum(result.aux_loss for result in results.values())
        fields["aux_loss"] = aux
        extra = aux
        ssl = {n: r.ssl_loss for n, r in results.items() if r.ssl_loss is not None}
        if ssl:
            fields["ssl_loss"] = next(iter(ssl.values())) if single else ssl
            extra = extra + sum(self.peft_config[n].ssl_loss_weight * loss for n, loss in ssl.items())
        heads = [result.logits for result in results.values() if result.logits is not None]
        labels = self.context.inputs.get("labels")
        if heads:
            fields["logits"] = sum(heads)
            if labels is not None:
                return fields, self.task_loss(fields["logits"], labels) + extra
        if base_loss is not None:
            return fields, base_loss + extra.to(base_loss.dtype)
        return fields, extra if ssl and self.model.training else None  # Specialization alone: no labels
