"""Auxiliary routing losses: CV² importance (with MoPE's hinge), Switch-Transformer balance and router z-loss."""

from __future__ import annotations

import torch


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
    flat = weights.reshape(-1, weights.shape[-1]).float()
    num_experts = flat.shape[-1]
    dispatch = torch.nn.functional.one_hot(flat.argmax(-1), num_experts).float().mean(0)
    return num_experts * (dispatch * flat.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition, which keeps router logits small and stable."""
    return torch.logsumexp(logits.float().reshape(-1, logits.shape[-1]), dim=-1).pow(2).mean()
