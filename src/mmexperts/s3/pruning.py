"""S3's sparsification: utility of each concept expert, pruning through a persistent expert mask, and routing
statistics over batches (mixed into :class:`~mmexperts.S3Model`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from ..moe.utility import (
    UTILITY_CRITERIA,
    check_mask,
    gate_mass,
    gate_output_norm,
    leave_one_out,
    prune_to_sparsity,
    usage_frequency,
)


class ExpertPruning:
    """Expert masks, utilities and pruning of an S3 tuner (needs ``_layers``, ``compute``, ``task_loss``,
    ``calling`` and ``single_adapter`` of :class:`~mmexperts.S3Model`)."""

    def _concept_adapter(self, adapter_name: str | None) -> str:
        """``adapter_name`` checked (or the one active adapter), refusing paper-design adapters."""
        name = self.single_adapter(adapter_name)
        if self.peft_config[name].design != "concepts":
            raise ValueError(f"Expert masks, utilities and pruning belong to S3's concepts design, but adapter "
                             f"{name!r} has design={self.peft_config[name].design!r}, which sparsifies at inference "
                             "with set_keep_ratio(p). Create the adapter with S3Config(design='concepts', ...) for "
                             "expert pruning.")
        return name

    def get_expert_mask(self, adapter_name: str | None = None) -> torch.Tensor:
        """A copy of the adapter's expert mask (K,) bool; ``False`` marks pruned experts."""
        return self._layers()["vision"].s3_expert_mask[self._concept_adapter(adapter_name)].clone()

    def set_expert_mask(self, mask, adapter_name: str | None = None) -> None:
        """Set the adapter's persistent expert mask (saved and loaded with the adapter)."""
        name = self._concept_adapter(adapter_name)
        masks = self._layers()["vision"].s3_expert_mask
        masks[name] = check_mask(mask, masks[name].numel()).to(masks[name].device)

    def active_experts(self, adapter_name: str | None = None) -> list[int]:
        """Indices of the experts that are not pruned."""
        return self.get_expert_mask(adapter_name).nonzero().flatten().tolist()

    @torch.no_grad()
    def routing_statistics(self, batches: Iterable[dict], adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Routing weights (examples, K), concept embeddings (examples, K, d_e), logits and labels over ``batches``
        (eval mode, one adapter, whatever adapters are active)."""
        name = self._concept_adapter(adapter_name)
        was_training = self.model.training
        self.model.eval()
        collected = {"routing_weights": [], "concept_embeds": [], "logits": [], "labels": []}
        try:
            for batch in batches:
                with self.calling(batch), without_s3_inputs(self.model, ("task_ids", "labels")):
                    self.model(**batch)
                    result = self.compute(name)
                if result is None:
                    raise ValueError("S3 needs both towers to run; pass both modalities' inputs in every batch.")
                collected["routing_weights"].append(result.routing_weights.float())
                collected["concept_embeds"].append(result.concept_embeds.float())
                if result.logits is not None and batch.get("labels") is not None:
                    collected["logits"].append(result.logits.float())
                    collected["labels"].append(batch["labels"])
        finally:
            self.model.train(was_training)
        return {k: torch.cat(v) for k, v in collected.items() if v}

    @torch.no_grad()
    def evaluate_loss(self, batches: Iterable[dict], adapter_name: str | None = None,
                      expert_mask: torch.Tensor | None = None) -> float:
        """Mean task loss over labelled ``batches`` (optionally under a temporary expert mask)."""
        name = self._concept_adapter(adapter_name)
        saved = self.get_expert_mask(name)
        if expert_mask is not None:
            self.set_expert_mask(expert_mask, name)
        try:
            stats = self.routing_statistics(batches, name)
        finally:
            self.set_expert_mask(saved, name)
        if "logits" not in stats:
            raise ValueError("Loss-based utility needs an adapter with a task head and batches with `labels`.")
        return float(self.task_loss(stats["logits"], stats["labels"]))

    def expert_utility(self, batches: Iterable[dict], criterion: str = "loss",
                       adapter_name: str | None = None) -> torch.Tensor:
        """Utility (K,) of every active expert on ``batches`` (pruned experts: nan); higher is more useful.

        ``"loss"`` (default): leave-one-out rise of the task loss; ``"gate_mass"``: mean routing weight; ``"usage"``:
        top-1 routing frequency; ``"gate_output_norm"``: mean ``g_k * ||u_k||`` where active (REAP).
        """
        if criterion not in UTILITY_CRITERIA:
            raise ValueError(f"criterion must be one of {UTILITY_CRITERIA}, got {criterion!r}.")
        name = self._concept_adapter(adapter_name)
        batches = list(batches)
        mask = self.get_expert_mask(name)
        if criterion == "loss":
            return leave_one_out(lambda m: self.evaluate_loss(batches, name, m), mask)
        stats = self.routing_statistics(batches, name)
        if criterion == "gate_mass":
            return gate_mass(stats["routing_weights"], mask)
        if criterion == "usage":
            return usage_frequency(stats["routing_weights"], mask)
        return gate_output_norm(stats["routing_weights"], stats["concept_embeds"], mask)

    def prune(self, sparsity: float, batches: Iterable[dict], criterion: str = "loss",
              pruning_schedule: str = "one-shot", adapter_name: str | None = None, on_prune=None) -> torch.Tensor:
        """Prune the adapter's lowest-utility experts until ``round(sparsity * K)`` are removed; returns the mask.

        ``pruning_schedule="progressive"`` removes one expert at a time, rescoring (and calling ``on_prune(mask)``,
        e.g. a short fine-tune) after each removal.
        """
        name = self._concept_adapter(adapter_name)
        batches = list(batches)

        def utility_of(mask):
            self.set_expert_mask(mask, name)
            return self.expert_utility(batches, criterion, name)

        def apply(mask):
            self.set_expert_mask(mask, name)
            if on_prune is not None:
                on_prune(mask)

        mask = prune_to_sparsity(utility_of, self.get_expert_mask(name), sparsity, pruning_schedule, apply)
        self.set_expert_mask(mask, name)
        return mask

    def restore_experts(self, adapter_name: str | None = None) -> None:
        """Un-prune: make every expert active again."""
        name = self._concept_adapter(adapter_name)
        self.set_expert_mask(torch.ones_like(self.get_expert_mask(name)), name)

    def router_and_head_parameters(self, adapter_name: str | None = None) -> list[nn.Parameter]:
        """The parameters a post-pruning fine-tune trains: the router, task embedding and heads."""
        core = self._layers()["vision"].s3_core[self._concept_adapter(adapter_name)]
        params = [*core.router.parameters(), *core.task_embedding.parameters(), *core.summary_norm.parameters()]
        return params + ([core.head_weight, core.head_bias] if core.num_labels else [])


@contextmanager
def without_s3_inputs(model: nn.Module, names: tuple[str, ...]):
    """``task_ids`` is S3's, and so are ``labels`` when S3's heads give the logits (the base model's own head may
    have other classes): the base model never sees them."""

    def drop(module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if k not in names}

    handle = model.register_forward_pre_hook(drop, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
