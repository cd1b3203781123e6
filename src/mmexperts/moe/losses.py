"""Auxiliary losses: CV² importance (with MoPE's hinge), Switch-Transformer balance, router z-loss, InfoNCE."""

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
