import pytest
import torch

from mmexperts.moe import ExpertMLPs, Router, top_k_weights


def _routed(num_tokens=37, num_experts=6, k=2, dim=8, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(num_tokens, dim)
    weights = top_k_weights(torch.randn(num_tokens, num_experts).softmax(-1), k)
    return x, weights


def test_sparse_dispatch_matches_dense_outputs_and_gradients():
    x, weights = _routed()
    outputs, grads = {}, {}
    for mode in ("sparse", "dense"):
        torch.manual_seed(1)
        experts = ExpertMLPs(6, 8, 16, 5, dispatch=mode)
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = experts(xx, ww)
        out.square().sum().backward()
        outputs[mode] = out
        # only the selected experts' weights carry gradient back to a top-k router
        grads[mode] = [xx.grad, ww.grad[weights > 0], experts.w1.grad, experts.b2.grad]
    torch.testing.assert_close(outputs["sparse"], outputs["dense"], rtol=1e-5, atol=1e-5)
    for sparse, dense in zip(grads["sparse"], grads["dense"]):
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)


def test_sparse_dispatch_equals_explicit_per_token_mixture_and_keeps_leading_shape():
    x, weights = _routed(num_tokens=12)
    experts = ExpertMLPs(6, 8, 16)
    out = experts(x.reshape(3, 4, 8), weights.reshape(3, 4, 6))
    assert out.shape == (3, 4, 8)
    expected = torch.stack([sum(weights[n, e] * experts.expert(e, x[n]) for e in range(6)) for n in range(12)])
    torch.testing.assert_close(out.reshape(12, 8), expected, rtol=1e-5, atol=1e-6)


def test_experts_with_zero_weight_are_never_run():
    x, weights = _routed()
    weights[:, 3] = 0
    experts = ExpertMLPs(6, 8, 16)
    calls = []
    original = experts.expert
    experts.expert = lambda index, tokens: calls.append(index) or original(index, tokens)
    experts(x, weights)
    assert 3 not in calls and len(calls) == 5


def test_bad_weights_shape_and_mode_are_rejected():
    with pytest.raises(ValueError, match="dispatch"):
        ExpertMLPs(4, 8, 8, dispatch="scatter")
    with pytest.raises(ValueError, match="weights must have shape"):
        ExpertMLPs(4, 8, 8)(torch.randn(3, 8), torch.randn(3, 5))


def test_router_mask_zeroes_pruned_experts_and_top_k_without_renormalisation():
    torch.manual_seed(0)
    router = Router(8, 6, top_k=2, learn_keys=True, renormalize=False)
    query = torch.randn(10, 8)
    mask = torch.tensor([True, False, True, True, False, True])
    weights = router(query, expert_mask=mask).weights
    assert torch.all(weights[:, ~mask] == 0)
    assert torch.all((weights > 0).sum(-1) == 2)
    assert torch.all(weights.sum(-1) < 1)
    with pytest.raises(ValueError, match="no expert"):
        router(query, expert_mask=torch.zeros(6, dtype=torch.bool))


def test_switch_balance_loss_is_one_when_balanced_and_k_when_collapsed():
    from mmexperts.moe import switch_balance_loss
    balanced = torch.eye(4).repeat(3, 1)           # each expert takes a quarter of the rows, all its mass
    collapsed = torch.zeros(12, 4)
    collapsed[:, 0] = 1
    assert switch_balance_loss(balanced).item() == pytest.approx(1.0)
    assert switch_balance_loss(collapsed).item() == pytest.approx(4.0)


def test_info_nce_is_symmetric_and_low_for_matching_pairs():
    from mmexperts.moe import info_nce
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    matched = info_nce(a, a * 3, temperature=0.05)   # scale does not matter: cosine similarities
    shuffled = info_nce(a, a[torch.randperm(8)], temperature=0.05)
    assert matched.item() < 1e-3 < shuffled.item()
    torch.testing.assert_close(info_nce(a, a.flip(0), 0.1), info_nce(a.flip(0), a, 0.1))
