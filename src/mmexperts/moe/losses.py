"""Auxiliary and representation losses: CV² importance (with MoPE's hinge), Switch-Transformer balance, router z-loss,
InfoNCE, cross-modal supervised contrastive (SupCon) and class compactness."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utility import gate_mass, usage_frequency


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (unbiased std / mean)² of a vector; zero for fewer than two entries."""
    values = values.float()
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + 1e-10)


def importance_loss(weights: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """CV² of each expert's routing mass summed over the batch; zero when it is at or below ``threshold``.

    The hinge (0.1 in MoPE) tolerates mild imbalance so that experts can specialise.
    """
    loss = cv_squared(weights.reshape(-1, weights.shape[-1]).sum(0))
    return torch.where(loss > threshold, loss, torch.zeros_like(loss))


def switch_balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balance: ``K * sum_k f_k * P_k`` (f: top-1 dispatch fraction, P: mean probability)."""
    return weights.shape[-1] * (usage_frequency(weights) * gate_mass(weights)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition, which keeps router logits small and stable."""
    return torch.logsumexp(logits.float().reshape(-1, logits.shape[-1]), dim=-1).pow(2).mean()


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between matching rows of ``a`` and ``b`` (batch, d): cosine similarities over in-batch
    negatives at a fixed temperature, computed in float32."""
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def supervised_contrastive(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-modal SupCon: each row of ``a`` (batch, d) is an anchor against all rows of ``b``, with every row of the
    same label a positive (``-mean_p log softmax``, averaged over anchors); symmetric over ``a -> b`` and ``b -> a``."""
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
    labels = labels.reshape(-1)
    positive = (labels[:, None] == labels[None, :]).float()
    count = positive.sum(-1)

    def anchored(scores):
        return (-(scores.log_softmax(-1) * positive).sum(-1) / count).mean()

    return (anchored(logits) + anchored(logits.T)) / 2


def compactness_loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """von Mises-Fisher compactness: ``-mean_i <mu_i, m_(y_i)>`` with ``mu_i`` the unit-norm row of ``z`` (batch, d)
    and ``m_c`` the unit-norm mean direction of class ``c`` in the batch; pulls samples toward their class mean."""
    mu = F.normalize(z.float(), dim=-1)
    _, inverse = labels.reshape(-1).unique(return_inverse=True)
    sums = mu.new_zeros(int(inverse.max()) + 1, mu.shape[-1]).index_add(0, inverse, mu)
    return -(mu * F.normalize(sums, dim=-1)[inverse]).sum(-1).mean()
