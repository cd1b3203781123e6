"""The controllable factor generator: contract columns, determinism, which factors the label depends on, errors."""

from __future__ import annotations

import re

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmexperts.data import load_task
from mmexperts.offline.factors import FACTOR_GROUPS, FactorSpec, build_factor_dataset

SMALL = {"num_train": 64, "num_validation": 16, "num_test": 24, "seq_len": 6, "dim_a": 12, "dim_b": 10}


def _ridge_accuracy(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    """Held-out accuracy of a ridge-regression linear probe on +-1 targets."""
    train, test = np.c_[train, np.ones(len(train))], np.c_[test, np.ones(len(test))]
    weight = np.linalg.solve(train.T @ train + 0.1 * np.eye(train.shape[1]), train.T @ (2.0 * y_train - 1.0))
    return float(((test @ weight > 0) == y_test).mean())


def test_contract_columns_shapes_and_info():
    data = build_factor_dataset(**SMALL, seed=3)
    assert list(data) == ["train", "validation", "test"]
    assert [len(data[s]) for s in data] == [64, 16, 24]
    features = data["train"].features
    assert list(features) == ["modality_a", "modality_b", "label"]
    assert features["modality_a"] == datasets.Array2D((6, 12), "float32")
    assert features["modality_b"] == datasets.Array2D((6, 10), "float32")
    assert features["label"].names == ["negative", "positive"]
    batch = next(iter(DataLoader(data["train"].with_format("torch"), batch_size=8)))
    assert batch["modality_a"].shape == (8, 6, 12) and batch["modality_a"].dtype == torch.float32
    assert batch["modality_b"].shape == (8, 6, 10) and batch["label"].dtype == torch.int64
    assert set(batch["label"].tolist()) <= {0, 1}
    spec = FactorSpec.from_info(data["test"].info)
    assert spec == FactorSpec(6, 12, 10, 2, 2, 2, 1, 2, FACTOR_GROUPS, 0.1, 3)
    assert spec.groups("a") == {"shared": 2, "unique_a": 2, "synergy": 1, "noise": 2}
    assert spec.groups("b") == {"shared": 2, "unique_b": 2, "synergy": 1, "noise": 2}


def test_deterministic_and_splits_independent_of_other_sizes():
    first, second = build_factor_dataset(**SMALL, seed=7), build_factor_dataset(**SMALL, seed=7)
    for split in first:
        for column in ("modality_a", "modality_b", "label"):
            np.testing.assert_array_equal(first[split].with_format("numpy")[:][column],
                                          second[split].with_format("numpy")[:][column])
    other_seed = build_factor_dataset(**SMALL, seed=8)
    assert not np.allclose(first["train"].with_format("numpy")[:]["modality_a"],
                           other_seed["train"].with_format("numpy")[:]["modality_a"])
    bigger_train = build_factor_dataset(**{**SMALL, "num_train": 100}, seed=7)
    np.testing.assert_array_equal(first["test"].with_format("numpy")[:]["modality_b"],
                                  bigger_train["test"].with_format("numpy")[:]["modality_b"])


def test_each_token_shows_one_group_in_a_per_sample_order():
    data = build_factor_dataset(**{**SMALL, "seq_len": 5}, shared_dims=2, unique_a_dims=2, unique_b_dims=0,
                                synergy_dims=0, noise_dims=0, label_from=("shared",), noise_std=0.0, seed=0)
    tokens = data["train"].with_format("numpy")[:]["modality_a"]
    patterns = set()
    for sample in tokens:
        distinct, which = np.unique(sample.round(5), axis=0, return_inverse=True)
        assert len(distinct) == 2 and sorted(np.bincount(which.ravel())) == [2, 3]  # round-robin over 2 groups
        patterns.add(tuple(which.ravel() == which.ravel()[0]))
    assert len(patterns) > 1  # group positions differ between samples, so position alone tells nothing
    only_shared = data["train"].with_format("numpy")[:]["modality_b"]
    np.testing.assert_allclose(only_shared, np.repeat(only_shared[:, :1], 5, axis=1))


@pytest.mark.parametrize("label_from", [("shared",), ("unique_a",), ("synergy",), ("unique_b", "synergy")])
def test_label_is_the_sign_of_the_chosen_factors_only(label_from):
    data, latents = build_factor_dataset(**{**SMALL, "num_train": 2000}, label_from=label_from, seed=1,
                                         return_latents=True)
    z = latents["train"]
    scores = {"shared": z["shared"].sum(1) / np.sqrt(2), "unique_a": z["unique_a"].sum(1) / np.sqrt(2),
              "unique_b": z["unique_b"].sum(1) / np.sqrt(2), "synergy": (z["synergy_a"] * z["synergy_b"]).sum(1)}
    labels = np.asarray(data["train"]["label"])
    np.testing.assert_array_equal(labels, sum(scores[g] for g in label_from) > 0)
    assert 0.4 < labels.mean() < 0.6
    for group in set(FACTOR_GROUPS) - set(label_from):  # a left-out group alone predicts nothing
        assert abs(((scores[group] > 0) == labels).mean() - 0.5) < 0.05
    for nuisance in ("noise_a", "noise_b", "synergy_a", "synergy_b"):  # nor does either half of the synergy
        assert abs(((z[nuisance][:, 0] > 0) == labels).mean() - 0.5) < 0.05


@pytest.mark.parametrize("strength, modalities", [(0.8, ("a", "b")), (1.0, ("b",))])
def test_spurious_nuisance_agrees_with_the_label_in_train_only(strength, modalities):
    kwargs = {**SMALL, "num_train": 4000, "num_validation": 2000, "num_test": 2000, "label_from": ("shared",),
              "seed": 4}
    data, latents = build_factor_dataset(**kwargs, spurious_strength=strength, spurious_modalities=modalities,
                                         return_latents=True)
    clean, clean_latents = build_factor_dataset(**kwargs, return_latents=True)
    for split in ("train", "validation", "test"):
        labels = np.asarray(data[split]["label"])
        np.testing.assert_array_equal(labels, clean[split]["label"])  # the label never changes
        for modality in ("a", "b"):
            noise = latents[split][f"noise_{modality}"]
            agreement = ((noise.sum(1) > 0) == labels).mean()
            if split == "train" and modality in modalities:
                assert abs(agreement - (1 + strength) / 2) < 0.02, (split, modality, agreement)
                np.testing.assert_allclose(np.abs(noise), np.abs(clean_latents[split][f"noise_{modality}"]))
            else:
                assert abs(agreement - 0.5) < 0.04, (split, modality, agreement)
                np.testing.assert_array_equal(noise, clean_latents[split][f"noise_{modality}"])
    for split in ("validation", "test"):  # held-out splits are exactly the unshifted data
        np.testing.assert_array_equal(data[split].with_format("numpy")[:]["modality_b"],
                                      clean[split].with_format("numpy")[:]["modality_b"])
    spec = FactorSpec.from_info(data["train"].info)
    assert spec.spurious_strength == strength and spec.spurious_modalities == modalities


def test_spurious_nuisance_is_visible_to_a_probe_on_the_features():
    """A linear probe on modality b's tokens (label from modality a only) reads the shortcut in train."""
    data = build_factor_dataset(num_train=2000, num_validation=8, num_test=800, seq_len=6, dim_a=12, dim_b=12,
                                label_from=("unique_a",), spurious_strength=1.0, spurious_modalities="b", seed=5)
    train, test = data["train"].with_format("numpy")[:], data["test"].with_format("numpy")[:]
    b_train, b_test = train["modality_b"].mean(1), test["modality_b"].mean(1)
    assert _ridge_accuracy(b_train[:1000], train["label"][:1000], b_train[1000:], train["label"][1000:]) > 0.8
    assert abs(_ridge_accuracy(b_train, train["label"], b_test, test["label"]) - 0.5) < 0.07


@pytest.mark.parametrize("label_from, expect_a, expect_b, expect_bilinear", [
    (("unique_a",), "high", "chance", "high"),
    (("unique_b",), "chance", "high", "high"),
    (("shared",), "high", "high", "high"),
    (("synergy",), "chance", "chance", "high"),
])
def test_per_modality_probes_see_what_the_factors_promise(label_from, expect_a, expect_b, expect_bilinear):
    """Linear probes on token-mean features: unique labels live in one modality, synergy only in the pair."""
    data = build_factor_dataset(num_train=2000, num_validation=8, num_test=800, seq_len=8, dim_a=16, dim_b=16,
                                label_from=label_from, seed=2)
    train, test = data["train"].with_format("numpy")[:], data["test"].with_format("numpy")[:]

    def views(rows):
        a, b = rows["modality_a"].mean(1), rows["modality_b"].mean(1)
        return {"a": a, "b": b, "pair": np.c_[a, b], "bilinear": (a[:, :, None] * b[:, None, :]).reshape(len(a), -1)}

    train_views, test_views = views(train), views(test)
    accuracy = {v: _ridge_accuracy(train_views[v], train["label"], test_views[v], test["label"]) for v in train_views}
    for view, expected in (("a", expect_a), ("b", expect_b), ("bilinear", expect_bilinear)):
        assert accuracy[view] > 0.85 if expected == "high" else abs(accuracy[view] - 0.5) < 0.07, (view, accuracy)
    if label_from == ("synergy",):
        assert abs(accuracy["pair"] - 0.5) < 0.07  # no linear read-out of the concatenation either


@pytest.mark.parametrize("kwargs, message", [
    ({"num_train": 0}, "num_train must be a positive integer, got 0"),
    ({"dim_a": 2.5}, "dim_a must be a positive integer, got 2.5"),
    ({"shared_dims": -1}, "shared_dims must be an integer >= 0"),
    ({"label_from": ("shared", "colour")}, "label_from must be a non-empty subset of"),
    ({"label_from": ()}, "label_from must be a non-empty subset of"),
    ({"label_from": ("shared", "shared")}, "without repeats"),
    ({"synergy_dims": 0, "label_from": ("shared", "synergy")}, "give them synergy_dims > 0"),
    ({"noise_std": -0.1}, "noise_std must be a finite number >= 0, got -0.1"),
    ({"seq_len": 3}, "seq_len=3 is shorter than the 4 factor groups of modality a"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"spurious_strength": 1.5}, "spurious_strength must be a number in [0, 1] (0: no spurious correlation), got 1.5"),
    ({"spurious_strength": 0.5, "noise_dims": 0}, "needs noise factors to correlate: give noise_dims > 0"),
    ({"spurious_modalities": ("c",)}, "spurious_modalities must be a non-empty subset of ('a', 'b')"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_factor_dataset(**{**SMALL, **kwargs})


def test_spec_of_other_data_is_a_clear_error():
    with pytest.raises(ValueError, match="not built by build_factor_dataset"):
        FactorSpec.from_info(datasets.DatasetInfo(description="MultiBench mosi"))


def test_load_task_builds_the_factor_task():
    task = load_task("synthetic:factors", train_size=40, eval_size=12, seed=5, max_rows=30, seq_len=4,
                     label_from="unique_a", noise_dims=0)
    assert task.task_type == "single_label_classification" and task.label_names == ["negative", "positive"]
    assert [len(task.dataset[s]) for s in ("train", "validation", "test")] == [30, 12, 12]
    assert FactorSpec.from_info(task.dataset["train"].info).label_from == ("unique_a",)
    direct = build_factor_dataset(num_train=40, num_validation=12, num_test=12, seq_len=4, label_from="unique_a",
                                  noise_dims=0, seed=5)
    np.testing.assert_array_equal(task.dataset["test"].with_format("numpy")[:]["modality_a"],
                                  direct["test"].with_format("numpy")[:]["modality_a"])
