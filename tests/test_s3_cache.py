"""S3 from cached tower features: ``tower_tokens`` + ``connect`` equal the PeftModel's forward, the recipe trains from
the cache with the towers' losses and metrics, the cache key names the method, and adapters without heads are
refused."""

from __future__ import annotations

import peft
import pytest
import torch

from mmexperts import AltMoEConfig, S3Config
from mmexperts.altmoe.features import CachedFeatures, FeatureConnector, write_features
from mmexperts.errors import ConfigError
from mmexperts.training import TrainConfig, Trainer
from mmexperts.training.assembly import build_base, with_adapter
from mmexperts.training.features import FeatureBatches, cache_key, cached_split, feature_tuner

from conftest import assert_resumes_exactly, make_batch, make_classifier, tiny_config

S3 = dict(method="s3", dataset="synthetic:entailment", frozen_dropout=False,
          method_config={"num_experts": 4, "latent_size": 16, "init_weights": False})
DESIGNS = {"paper-specialization": dict(design="paper"), "paper-selection": dict(design="paper", stage="selection"),
           "concepts": dict(design="concepts")}


def s3_model(**config) -> peft.PeftModel:
    torch.manual_seed(0)
    return peft.get_peft_model(make_classifier(), S3Config(num_experts=4, latent_size=16, init_weights=False,
                                                           **config))


def assert_same_fields(cached, direct) -> None:
    assert cached.keys() <= direct.keys() and {"loss", "logits", "aux_loss", "routing_weights"} <= cached.keys()
    for key in cached.keys():
        torch.testing.assert_close(cached[key], direct[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("design", DESIGNS)
def test_connect_on_tower_tokens_equals_the_forward(design, training):
    model = s3_model(**DESIGNS[design])
    tuner, batch = model.base_model, make_batch()
    with torch.no_grad():
        (image, image_mask), (text, text_mask) = (tuner.tower_tokens(m, **batch) for m in ("vision", "text"))
    assert image_mask.dtype == torch.bool and text_mask.sum(1).tolist() == batch["attention_mask"].sum(1).tolist()
    model.train(training)
    torch.manual_seed(1)  # the specialization stage draws augmented views in training
    direct = model(**batch)
    torch.manual_seed(1)
    cached = FeatureConnector(model)(image, image_mask.long(), text, text_mask.long(), labels=batch["labels"])
    assert_same_fields(cached, direct)
    assert cached.keys() == direct.keys() - {"vision_embeds", "text_embeds"}  # only the base model's own fields
    if design == "paper-specialization" and training:
        assert {"rep_loss", "dsc_loss", "stage_loss"} <= cached.keys()


def test_adapters_without_heads_are_refused_with_the_fix():
    model = s3_model(design="concepts", num_labels=0)
    tuner = model.base_model
    with torch.no_grad():
        tokens = [t for m in ("vision", "text") for t in tuner.tower_tokens(m, **make_batch())]
    with pytest.raises(ConfigError, match=r"no head of their own \(num_labels=0\).*classifier base.*--cache_features"):
        tuner.connect(*tokens)


def test_multi_label_rows_carry_their_labels(tmp_path):
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    tensors = {"image_tokens": torch.randn(3, 2, 4), "image_mask": torch.ones(3, 2, dtype=torch.long),
               "text_tokens": torch.randn(3, 5, 4), "text_mask": torch.tensor([[1, 1, 0, 0, 0]] * 3),
               "labels": labels}
    batches = FeatureBatches(CachedFeatures(write_features(tensors, tmp_path / "features")))
    batch = batches.__getitems__([2, 0])
    assert torch.equal(batch["labels"], labels[[2, 0]]) and batch["text_tokens"].shape == (2, 2, 4)
    assert torch.equal(batches[1]["labels"], labels[1])


def recorded_losses(monkeypatch) -> list[float]:
    """The loss of every optimizer step of the runs that follow, in order."""
    losses = []
    original = Trainer.on_step_end
    monkeypatch.setattr(Trainer, "on_step_end", lambda self, loss: (losses.append(loss), original(self, loss)))
    return losses


@pytest.mark.parametrize("design", ["paper", "concepts"])
def test_training_from_the_cache_gives_the_towers_losses_and_metrics(backbones, tmp_path, monkeypatch, design):
    runs, losses = {}, recorded_losses(monkeypatch)
    for cached in (True, False):
        config = tiny_config(backbones, tmp_path / f"run-{cached}", cache_features=cached, max_steps=6, eval_steps=3,
                             **{**S3, "method_config": {**S3["method_config"], "design": design}})
        trainer = Trainer(config)
        results = trainer.train()
        assert isinstance(trainer.accelerator.unwrap_model(trainer.model), FeatureConnector) == cached
        runs[cached] = losses[:], results
        losses.clear()
    (cached_losses, cached_results), (tower_losses, tower_results) = runs[True], runs[False]
    assert len(cached_losses) == len(tower_losses) == 6
    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(tower_losses), rtol=1e-5, atol=1e-5)
    assert cached_results.keys() == tower_results.keys()
    for key, value in tower_results.items():
        if key.startswith("eval_"):
            assert cached_results[key] == pytest.approx(value, abs=1e-4), key
    assert [p.name.split("-")[0] for p in sorted((tmp_path / "feature-cache").iterdir()) if p.is_dir()] == \
        ["eval", "train"]
    cache = CachedFeatures(next((tmp_path / "feature-cache").glob("train-*")))
    assert cache.tensors["labels"].dtype == torch.int64 and len(cache) == 64  # one row per example, no captions


def test_an_altmoe_cache_is_not_read_for_s3(backbones, tmp_path):
    trainer = Trainer(tiny_config(backbones, tmp_path / "s3", cache_features=True, max_steps=1, **S3))
    trainer.setup()
    config, split, root = trainer.config, trainer.task.dataset["train"], tmp_path / "feature-cache"
    (s3_folder,) = root.glob("train-*")
    altmoe_config = AltMoEConfig(num_experts=4, hidden_size=16)
    altmoe = with_adapter(build_base(config, trainer.task, altmoe_config, backbones, trainer.accelerator),
                          altmoe_config)
    keys = {name: cache_key(feature_tuner(model), trainer.collator, split, False)
            for name, model in (("s3", trainer.model.peft_model), ("altmoe", altmoe))}
    assert {part for part in keys["s3"] if keys["s3"][part] != keys["altmoe"][part]} == {"features"}
    assert keys["s3"]["features"]["method"] == "s3" and keys["altmoe"]["features"]["method"] == "altmoe"
    altmoe_cache = cached_split(altmoe, split, trainer.collator, "train", False, root, labelled=True, log=print)
    folders = set(root.glob("train-*"))
    assert len(folders) == 2 and s3_folder in folders  # the Alt-MoE cache went to a folder of its own
    s3_cache = CachedFeatures(s3_folder)
    assert not torch.equal(s3_cache.tensors["text_tokens"], altmoe_cache.tensors["text_tokens"])


def test_resumed_cached_run_continues_to_the_same_weights(backbones, tmp_path, monkeypatch):
    assert_resumes_exactly(lambda folder, **overrides: tiny_config(backbones, tmp_path / folder, cache_features=True,
                                                                   **S3, **overrides), monkeypatch)


def test_the_default_stays_off_for_s3_and_feature_tasks_refuse_the_cache():
    assert TrainConfig(method="altmoe", dataset="synthetic:retrieval").cache_features
    assert not TrainConfig(method="s3", dataset="synthetic:entailment").cache_features
    assert TrainConfig(method="s3", dataset="synthetic:entailment", cache_features=True).cache_features
    assert not TrainConfig(method="s3", dataset="synthetic:factors").cache_features
    with pytest.raises(ConfigError, match="feature-sequence task"):
        TrainConfig(method="s3", dataset="synthetic:factors", cache_features=True)
    with pytest.raises(ConfigError, match="--cache_features needs a method"):
        TrainConfig(method="mope", dataset="synthetic:entailment", cache_features=True)
