"""Faster training from cached tower features, computing what it computed before: batches gathered whole from the
cache (``FeatureBatches``) equal the per-example collation of ``CachedFeatures``, and the experts' stacked
activation + dropout (CPU, training) equals one call per expert, outputs and gradients bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mmexperts.altmoe.features import CachedFeatures, write_features
from mmexperts.moe import ExpertMLPs, top_k_weights
from mmexperts.training.features import FeatureBatches


def write_cache(folder, images: int = 7, captions: int | None = 15, length: int = 6, seed: int = 0):
    """A cache of ``images`` images and ``captions`` captions of 1..length real tokens (None: caption i of image i,
    the evaluation layout without ``text_rows``)."""
    generator = torch.Generator().manual_seed(seed)
    texts = images if captions is None else captions
    real = torch.randint(1, length + 1, (texts,), generator=generator)
    tensors = {"image_tokens": torch.randn(images, 5, 3, generator=generator),
               "image_mask": torch.ones(images, 5, dtype=torch.long),
               "text_tokens": torch.randn(texts, length, 4, generator=generator),
               "text_mask": (torch.arange(length) < real[:, None]).long(),
               "image_ids": torch.arange(images) * 10}
    if captions is not None:
        tensors["text_rows"] = torch.randint(0, images, (texts,), generator=generator)
    return CachedFeatures(write_features(tensors, folder))


def assert_same_batch(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape, key
        assert got[key].stride() == expected[key].stride(), key  # the same memory layout: the same reductions
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("captions", [15, None], ids=["every caption", "caption per image"])
def test_gathered_batches_equal_the_per_example_collation(tmp_path, captions):
    cached = write_cache(tmp_path / "cache", captions=captions)
    batches = FeatureBatches(cached)
    assert len(batches) == len(cached) and batches.num_images == cached.num_images
    for indices in ([0], [3, 1, 4, 1, 5], list(range(len(cached)))[::-1]):
        expected = CachedFeatures.collate([cached[i] for i in indices])
        assert_same_batch(FeatureBatches.collate(batches.__getitems__(indices)), expected)
    assert_same_batch(batches[2], cached[2])


def test_a_shuffled_loader_draws_the_same_batches_as_before(tmp_path):
    cached = write_cache(tmp_path / "cache")

    def loader(dataset, collate):
        return DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True, collate_fn=collate,
                          generator=torch.Generator().manual_seed(3))

    before, after = loader(cached, CachedFeatures.collate), loader(FeatureBatches(cached), FeatureBatches.collate)
    for _ in range(2):  # two epochs: the sampler's generator advances alike
        pairs = list(zip(before, after, strict=True))
        assert len(pairs) == len(cached) // 4
        for old, new in pairs:
            assert_same_batch(new, old)


def per_expert_reference(experts: ExpertMLPs, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The sparse dispatch as one ``expert(index, tokens)`` call (and so one dropout call) per routed expert."""
    token, expert = weights.nonzero(as_tuple=True)
    order = expert.argsort(stable=True)
    token, expert = token[order], expert[order]
    counts = torch.bincount(expert, minlength=experts.num_experts).tolist()
    chunks = x.index_select(0, token).split(counts)
    outputs = torch.cat([experts.expert(index, chunk) for index, chunk in enumerate(chunks) if len(chunk)])
    return x.new_zeros(x.shape[0], experts.w2.shape[-1]).index_add(0, token, outputs * weights[token, expert, None])


@pytest.mark.parametrize("pruned", [False, True], ids=["all experts", "one expert unrouted"])
def test_stacked_dropout_equals_one_dropout_call_per_expert(pruned):
    torch.manual_seed(0)
    x = torch.randn(53, 16)
    logits = torch.randn(53, 6)
    if pruned:
        logits[:, 2] = float("-inf")
    weights = top_k_weights(logits.softmax(-1), 2, renormalize=False)
    experts = ExpertMLPs(6, 16, 32, 8, dropout=0.3).train()
    results = []
    for run in (lambda xx, ww: experts(xx, ww), lambda xx, ww: per_expert_reference(experts, xx, ww)):
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        torch.manual_seed(7)  # the same dropout draws
        out = run(xx, ww)
        out.square().sum().backward()
        results.append([out.detach(), xx.grad, ww.grad] + [p.grad for p in experts.parameters()])
        experts.zero_grad(set_to_none=True)
    assert (results[0][0] != 0).any()
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)
    with torch.no_grad():  # and the masks did differ from no dropout at all
        assert not torch.equal(results[0][0], per_expert_reference(experts.eval(), x, weights))
