"""A router: scores a query against expert keys and turns the scores into mixture weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RouterOutput:
    """Raw logits (after temperature and noise) and the mixture weights over experts (rows sum to one)."""

    logits: torch.Tensor
    weights: torch.Tensor


def top_k_weights(weights: torch.Tensor, k: int, renormalize: bool = True) -> torch.Tensor:
    """Keep each row's ``k`` largest weights (renormalised to sum to one by default); the others become exactly zero."""
    if not 1 <= k <= weights.shape[-1]:
        raise ValueError(f"top_k must be between 1 and the number of experts ({weights.shape[-1]}), got {k}.")
    if k == weights.shape[-1]:
        return weights
    values, indices = weights.topk(k, dim=-1)
    sparse = torch.zeros_like(weights).scatter(-1, indices, values)
    if not renormalize:
        return sparse
    return sparse / sparse.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def keep_top_fraction(weights: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Batch-level sparsification: keep the ``ceil(keep_ratio * n)`` largest of the ``n`` non-zero routing pairs of
    ``weights`` (tokens, K) and zero the rest (ties: lower flat index first); ``keep_ratio=1`` returns ``weights``."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}; e.g. 0.3 keeps the top 30% of the "
                         "routing pairs of a batch.")
    if keep_ratio == 1:
        return weights
    flat = weights.reshape(-1)
    keep = math.ceil(keep_ratio * int((flat != 0).sum()))
    if keep == 0:
        return weights
    order = torch.sort(flat.detach().float(), descending=True, stable=True).indices[:keep]
    kept = torch.zeros_like(flat, dtype=torch.bool).index_fill(0, order, True)
    return torch.where(kept, flat, torch.zeros_like(flat)).reshape(weights.shape)


class Router(nn.Module):
    """``weights = softmax(query @ keys / temperature + noise)``, optionally restricted to the top-k experts.

    Keys are either learned, or frozen and orthogonally initialised (MoPE's "routing embeddings", kept as a buffer so
    that no optimiser or adapter toggle ever trains them). Gaussian noise of ``noise_std`` is added in training only.
    """

    def __init__(self, query_size: int, num_experts: int, temperature: float = 1.0, noise_std: float = 0.0,
                 top_k: int | None = None, learn_keys: bool = False, renormalize: bool = True, device=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}.")
        if temperature <= 0:
            raise ValueError(f"router temperature must be > 0, got {temperature}.")
        if noise_std < 0:
            raise ValueError(f"router noise_std must be >= 0, got {noise_std}.")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}.")
        self.num_experts = num_experts
        self.temperature = temperature
        self.noise_std = noise_std
        self.top_k = top_k
        self.renormalize = renormalize
        keys = torch.empty(query_size, num_experts)
        nn.init.orthogonal_(keys)
        keys = keys.to(device) if device is not None else keys
        if learn_keys:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)

    def forward(self, query: torch.Tensor, expert_mask: torch.Tensor | None = None) -> RouterOutput:
        logits = query @ self.keys.to(query.dtype) / self.temperature
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        if expert_mask is not None:
            if not bool(expert_mask.any()):
                raise ValueError("expert_mask keeps no expert: at least one expert must stay active.")
            logits = logits.masked_fill(~expert_mask.bool(), float("-inf"))
        weights = logits.softmax(-1)
        if self.top_k is not None:
            active = self.num_experts if expert_mask is None else int(expert_mask.sum())
            weights = top_k_weights(weights, min(self.top_k, active), self.renormalize)
        return RouterOutput(logits, weights)
