"""A bank of K two-layer MLP experts stored as stacked tensors, combined per token with sparse or dense dispatch, and
a token-level mixture of experts (router + bank) with batch-level keep-ratio sparsification."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .router import Router, keep_top_fraction

DISPATCH_MODES = ("sparse", "dense")


class ExpertMLPs(nn.Module):
    """``y_n = sum_k w_nk * (W2_k act(W1_k x_n + b1_k) + b2_k)`` for a (tokens x K) weight matrix ``w``.

    ``dispatch="sparse"`` groups tokens by the experts that have a non-zero weight for them and runs each expert only on
    its own tokens, so top-k routing (or pruned experts, whose weight is zero) costs k/K of the dense compute.
    ``dispatch="dense"`` runs every expert on every token and then mixes, as reference implementations do.
    """

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, out_features: int | None = None,
                 activation: str = "gelu", dropout: float = 0.0, dispatch: str = "sparse", device=None, dtype=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}.")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}.")
        if activation not in ("gelu", "relu", "silu"):
            raise ValueError(f"activation must be 'gelu', 'relu' or 'silu', got {activation!r}.")
        out_features = out_features or in_features
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.dispatch, self.activation = num_experts, dispatch, activation
        self.dropout = nn.Dropout(dropout)
        self.w1 = nn.Parameter(torch.empty(num_experts, in_features, hidden_features, **factory))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_features, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_features, out_features, **factory))
        self.b2 = nn.Parameter(torch.empty(num_experts, out_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, applied to each expert."""
        for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The output of expert ``index`` on tokens ``x`` (..., in_features)."""
        views = self.__dict__.get("_views")  # set by the sparse dispatch: per-expert views of one unbind(0) each
        w1, b1, w2, b2 = (v[index] for v in views) if views else (self.w1[index], self.b1[index], self.w2[index],
                                                                   self.b2[index])
        hidden = getattr(F, self.activation)(torch.addmm(b1, x, w1) if x.dim() == 2 else torch.matmul(x, w1) + b1)
        hidden = self.dropout(hidden)
        return torch.addmm(b2, hidden, w2) if hidden.dim() == 2 else torch.matmul(hidden, w2) + b2

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if weights.shape[:-1] != x.shape[:-1] or weights.shape[-1] != self.num_experts:
            raise ValueError(f"weights must have shape {tuple(x.shape[:-1]) + (self.num_experts,)} for tokens of shape "
                             f"{tuple(x.shape)}, got {tuple(weights.shape)}.")
        lead = x.shape[:-1]
        x, weights = x.reshape(-1, x.shape[-1]), weights.reshape(-1, self.num_experts).to(x.dtype)
        out = self._dense(x, weights) if self.dispatch == "dense" else self._sparse(x, weights)
        return out.reshape(*lead, out.shape[-1])

    def _dense(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        hidden = getattr(F, self.activation)(torch.einsum("nd,kdh->knh", x, self.w1) + self.b1[:, None])
        outputs = torch.einsum("knh,kho->kno", self.dropout(hidden), self.w2) + self.b2[:, None]
        return torch.einsum("kno,nk->no", outputs, weights)

    def _sparse(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        token, expert = weights.nonzero(as_tuple=True)
        order = expert.argsort(stable=True)
        token, expert = token[order], expert[order]
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        out = x.new_zeros(x.shape[0], self.w2.shape[-1])
        if not token.numel():
            return out
        active = [index for index, count in enumerate(counts) if count]
        chunks = x.index_select(0, token).split(counts)  # one gather; each expert gets a contiguous slice
        # Unbound views: the backward pass writes each stacked weight's gradient once, not once per expert.
        views = (self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0))
        if self.dropout.training and self.dropout.p > 0 and x.device.type == "cpu":
            outputs = self._stacked_hidden(views, active, [chunks[index] for index in active])
        else:
            self.__dict__["_views"] = views
            try:
                outputs = torch.cat([self.expert(index, chunks[index]) for index in active])
            finally:
                self.__dict__["_views"] = None
        return out.index_add(0, token, outputs * weights[token, expert, None])  # one scatter

    def _stacked_hidden(self, views: tuple, active: list[int], chunks: list[torch.Tensor]) -> torch.Tensor:
        """``expert(index, chunk)`` of each active expert on its tokens, concatenated, with the hidden activations of
        all experts stacked in that order for ONE activation and ONE dropout call instead of one each. On CPU dropout
        draws its mask element by element from one generator stream, so the stacked call draws exactly the masks the
        per-expert calls would, in the same order (other devices draw each call's mask from its own offset: they keep
        the per-expert calls)."""
        w1, b1, w2, b2 = views
        hidden = torch.cat([torch.addmm(b1[index], chunk, w1[index]) for index, chunk in zip(active, chunks)])
        hidden = self.dropout(getattr(F, self.activation)(hidden)).split([len(chunk) for chunk in chunks])
        return torch.cat([torch.addmm(b2[index], part, w2[index]) for index, part in zip(active, hidden)])


@dataclass
class TokenMoEOutput:
    """Mixed expert outputs (tokens, out), the kept routing weights (tokens, K; zero where not routed or pruned) and
    the router logits (tokens, K)."""

    output: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor


class TokenMoE(nn.Module):
    """A token-level mixture of experts: ``y = sum_i g_i(x) e_i(x)`` with ``g = TopK(softmax(x W_g / T))``.

    ``keep_ratio`` < 1 sparsifies a batch after routing: only the highest-scoring fraction of its (token, expert)
    pairs runs (see :func:`~mmexperts.moe.router.keep_top_fraction`); the dropped pairs cost no expert compute.
    """

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, top_k: int | None = None,
                 temperature: float = 1.0, noise_std: float = 0.0, renormalize: bool = False, dropout: float = 0.0,
                 dispatch: str = "sparse", device=None):
        super().__init__()
        self.router = Router(in_features, num_experts, temperature, noise_std, top_k=top_k, learn_keys=True,
                             renormalize=renormalize, device=device)
        self.experts = ExpertMLPs(num_experts, in_features, hidden_features, in_features, dropout=dropout,
                                  dispatch=dispatch, device=device)

    def forward(self, x: torch.Tensor, keep_ratio: float = 1.0) -> TokenMoEOutput:
        routed = self.router(x)
        weights = keep_top_fraction(routed.weights, keep_ratio)
        return TokenMoEOutput(self.experts(x, weights), weights, routed.logits)
