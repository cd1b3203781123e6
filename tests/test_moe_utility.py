"""Expert utility scores and pruning masks of the shared MoE core."""

from __future__ import annotations

import math

import pytest
import torch

from mmexperts.moe import (
    experts_to_prune,
    gate_mass,
    gate_output_norm,
    leave_one_out,
    prune_lowest,
    prune_to_sparsity,
    usage_frequency,
)
from mmexperts.moe.utility import check_mask

WEIGHTS = torch.tensor([[0.7, 0.2, 0.1, 0.0],
                        [0.1, 0.6, 0.3, 0.0],
                        [0.5, 0.0, 0.5, 0.0]])


def test_gate_mass_usage_and_gate_output_norm():
    mask = torch.tensor([True, True, True, False])
    torch.testing.assert_close(gate_mass(WEIGHTS)[:3], torch.tensor([1.3, 0.8, 0.9]) / 3)
    assert torch.isnan(gate_mass(WEIGHTS, mask)[3])
    torch.testing.assert_close(usage_frequency(WEIGHTS), torch.tensor([2, 1, 0, 0]) / 3)  # ties: first index
    outputs = torch.ones(3, 4, 2)
    outputs[:, 2] *= 10  # expert 2 writes large outputs
    norms = gate_output_norm(WEIGHTS, outputs, mask)
    root2 = math.sqrt(2)
    torch.testing.assert_close(norms[:3], torch.tensor([1.3 / 3 * root2, 0.8 / 2 * root2, 0.9 / 3 * 10 * root2]))
    assert torch.isnan(norms[3])


def test_leave_one_out_measures_the_loss_rise_of_removing_each_expert():
    importance = torch.tensor([0.5, 0.1, 2.0, 0.0])

    def loss_with(mask):  # a loss that rises by an expert's importance when it is removed
        return float(importance[~mask].sum())

    mask = torch.tensor([True, True, True, False])
    utility = leave_one_out(loss_with, mask)
    torch.testing.assert_close(utility[:3], importance[:3])
    assert torch.isnan(utility[3])
    assert leave_one_out(loss_with, torch.tensor([False, False, True, False]))[2] == float("inf")


def test_prune_lowest_and_to_sparsity_one_shot_and_progressive():
    utility = torch.tensor([3.0, 1.0, float("nan"), 2.0, 0.5, 4.0])
    mask = torch.tensor([True, True, False, True, True, True])
    assert prune_lowest(utility, mask, 2).tolist() == [True, False, False, True, False, True]
    assert torch.equal(prune_lowest(utility, mask, 0), mask)

    calls = []
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 6.0, 7.0])

    def utility_of(current):
        calls.append(current.clone())
        return torch.where(current, scores, torch.full_like(scores, float("nan")))

    full = torch.ones(8, dtype=torch.bool)
    one_shot = prune_to_sparsity(utility_of, full, 0.375)
    assert (~one_shot).nonzero().flatten().tolist() == [1, 3, 5] and len(calls) == 1
    calls.clear()
    seen = []
    progressive = prune_to_sparsity(utility_of, full, 0.375, "progressive", on_prune=seen.append)
    assert torch.equal(progressive, one_shot) and len(calls) == 3 and len(seen) == 3
    assert [int((~m).sum()) for m in seen] == [1, 2, 3]
    assert torch.equal(prune_to_sparsity(utility_of, full, 0.0), full)


def test_experts_to_prune_rounds_and_rejects_bad_sparsity():
    assert [experts_to_prune(s, 8) for s in (0, 0.125, 0.3, 0.5, 0.875)] == [0, 1, 2, 4, 7]
    for bad in (-0.1, 1.0, 2, True, "0.5"):
        with pytest.raises(ValueError, match=r"sparsity must be a fraction of experts to remove in \[0, 1\)"):
            experts_to_prune(bad, 8)
    with pytest.raises(ValueError, match="leaving none; use a sparsity of at most 0.7500"):
        experts_to_prune(0.9, 4)


def test_bad_masks_and_schedules_are_clear_errors():
    with pytest.raises(ValueError, match="keeps none of the 3 experts"):
        check_mask(torch.zeros(3, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match=r"must have shape \(3,\)"):
        check_mask(torch.ones(4, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match="Cannot prune 2 of the 2 active experts"):
        prune_lowest(torch.zeros(3), torch.tensor([True, False, True]), 2)
    with pytest.raises(ValueError, match="pruning_schedule must be one of"):
        prune_to_sparsity(lambda m: torch.zeros(4), torch.ones(4, dtype=torch.bool), 0.5, "gradual")
    with pytest.raises(ValueError, match="already prunes 2 experts, more than sparsity 0.25"):
        prune_to_sparsity(lambda m: torch.zeros(4), torch.tensor([True, False, False, True]), 0.25)
