"""Expert utility scores and pruning masks: which experts of a mixture to remove when sparsifying it.

A mask is a boolean vector over the K experts (``True`` = active). Utilities are float vectors over the K experts
where a higher value means more useful; experts already pruned get ``nan``. Pruning removes the lowest-utility active
experts, either at once (``"one-shot"``) or one at a time with utilities recomputed after each removal
(``"progressive"``, greedy).
"""

from __future__ import annotations

from typing import Callable

import torch

UTILITY_CRITERIA = ("loss", "gate_mass", "usage", "gate_output_norm")
PRUNING_SCHEDULES = ("one-shot", "progressive")


def experts_to_prune(sparsity: float, num_experts: int) -> int:
    """How many experts a target ``sparsity`` (fraction removed, in [0, 1)) removes: ``round(sparsity * K)``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a fraction of experts to remove in [0, 1), got {sparsity!r}; "
                         f"e.g. 0.5 removes half of the {num_experts} experts.")
    count = round(sparsity * num_experts)
    if count >= num_experts:
        raise ValueError(f"sparsity {sparsity} removes round({sparsity} * {num_experts}) = {count} of {num_experts} "
                         f"experts, leaving none; use a sparsity of at most {(num_experts - 1) / num_experts:.4f}.")
    return count


def check_mask(mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """A validated boolean copy of an expert mask; at least one expert must stay active."""
    mask = torch.as_tensor(mask)
    if mask.shape != (num_experts,):
        raise ValueError(f"An expert mask must have shape ({num_experts},), got {tuple(mask.shape)}.")
    mask = mask.bool().clone()
    if not bool(mask.any()):
        raise ValueError(f"The expert mask keeps none of the {num_experts} experts; at least one must stay active "
                         "(prune fewer experts).")
    return mask


def gate_mass(weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean routing weight of each expert over all rows of ``weights`` (..., K)."""
    return _masked(weights.reshape(-1, weights.shape[-1]).float().mean(0), mask)


def usage_frequency(weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of rows whose largest routing weight goes to each expert (top-1 usage)."""
    flat = weights.reshape(-1, weights.shape[-1]).float()
    return _masked(torch.nn.functional.one_hot(flat.argmax(-1), flat.shape[-1]).float().mean(0), mask)


def gate_output_norm(weights: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """REAP-style utility: mean of ``g_k * ||u_k||`` over the rows where expert k is active.

    ``weights`` is (..., K) and ``outputs`` the experts' outputs (..., K, d).
    """
    flat = weights.reshape(-1, weights.shape[-1]).float()
    norms = outputs.reshape(*flat.shape, -1).float().norm(dim=-1)
    active = (flat > 0).float()
    return _masked((flat * norms * active).sum(0) / active.sum(0).clamp_min(1), mask)


def leave_one_out(loss_with: Callable[[torch.Tensor], float], mask: torch.Tensor) -> torch.Tensor:
    """Utility as the rise of a (validation) loss when each active expert alone is removed: ``L(mask - k) - L(mask)``.

    ``loss_with(mask)`` evaluates the model under an expert mask. The last active expert gets ``inf``.
    """
    mask = mask.bool()
    base = float(loss_with(mask))
    utility = torch.full(mask.shape, float("nan"))
    for expert in mask.nonzero().flatten().tolist():
        reduced = mask.clone()
        reduced[expert] = False
        utility[expert] = float(loss_with(reduced)) - base if reduced.any() else float("inf")
    return utility


def prune_lowest(utility: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """A new mask without the ``count`` active experts of lowest utility (ties: lower index first)."""
    mask = mask.bool().clone()
    active = mask.nonzero().flatten()
    if count >= len(active):
        raise ValueError(f"Cannot prune {count} of the {len(active)} active experts: at least one must stay active.")
    if count <= 0:
        return mask
    scores = utility.float().cpu()[active.cpu()]
    scores = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
    order = sorted(range(len(active)), key=lambda i: (scores[i].item(), active[i].item()))
    mask[active[order[:count]]] = False
    return mask


def prune_to_sparsity(utility_of: Callable[[torch.Tensor], torch.Tensor], mask: torch.Tensor, sparsity: float,
                      pruning_schedule: str = "one-shot",
                      on_prune: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Prune ``mask`` until ``round(sparsity * K)`` experts are removed, lowest ``utility_of(mask)`` first.

    ``"one-shot"`` scores once and removes all at once; ``"progressive"`` removes one expert per round and rescores
    (``on_prune(mask)`` runs after each removal, e.g. a short fine-tune). Returns the new mask.
    """
    if pruning_schedule not in PRUNING_SCHEDULES:
        raise ValueError(f"pruning_schedule must be one of {PRUNING_SCHEDULES}, got {pruning_schedule!r}.")
    mask = mask.bool().clone()
    target = experts_to_prune(sparsity, mask.numel())
    pruned = int((~mask).sum())
    if pruned > target:
        raise ValueError(f"The mask already prunes {pruned} experts, more than sparsity {sparsity} asks for "
                         f"({target}); restore the experts first (set an all-True mask) to prune to a lower sparsity.")
    rounds = [target - pruned] if pruning_schedule == "one-shot" else [1] * (target - pruned)
    for count in rounds:
        if count:
            mask = prune_lowest(utility_of(mask), mask, count)
            if on_prune is not None:
                on_prune(mask)
    return mask


def _masked(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values
    return torch.where(mask.to(values.device).bool(), values, torch.full_like(values, float("nan")))
