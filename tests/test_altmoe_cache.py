"""Cached tower features in the engine: reuse, invalidation, corruption, equal losses, every caption, resume."""

from __future__ import annotations

import functools
import shutil
from collections import Counter

import pytest
import torch
from transformers import BertModel, ViTModel

from mmexperts.altmoe.features import FEATURES_FILE
from mmexperts.errors import CorruptFileError
from mmexperts.training import Trainer, train
from mmexperts.training.features import CaptionPairs

from conftest import assert_resumes_exactly, tiny_config

ALTMOE = dict(method="altmoe", dataset="synthetic:retrieval",
              method_config={"num_experts": 4, "top_k": 2, "hidden_size": 16, "init_weights": False, "dropout": 0.0})
QUICK = dict(max_steps=2, eval_steps=100, save_steps=100, **ALTMOE)


@pytest.fixture
def tower_calls(monkeypatch) -> Counter:
    """Count forward calls of the tiny backbones' ViT and BERT towers."""
    calls = Counter()
    for cls in (ViTModel, BertModel):
        original = cls.forward

        @functools.wraps(original)  # the towers' input names are read from the signature
        def counted(self, *args, _original=original, _name=cls.__name__, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    return calls


def cache_folders(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "feature-cache").iterdir() if p.is_dir())


def test_cache_is_built_once_and_reused_without_running_the_towers(backbones, tmp_path, tower_calls, capsys):
    train(tiny_config(backbones, tmp_path / "first", **QUICK))
    assert tower_calls["ViTModel"] > 0 and tower_calls["BertModel"] > 0
    assert [name.split("-")[0] for name in cache_folders(tmp_path)] == ["eval", "train"]
    assert "Caching tower features of the train split" in capsys.readouterr().out
    tower_calls.clear()
    results = train(tiny_config(backbones, tmp_path / "second", **QUICK))
    assert sum(tower_calls.values()) == 0 and results["steps"] == 2  # training and evaluation read the cache
    assert "Reading cached tower features of the train split" in capsys.readouterr().out


def perturbed_vision_tower(vision: str, folder) -> str:
    """A copy of the vision backbone with one weight changed."""
    shutil.copytree(vision, folder)
    model = ViTModel.from_pretrained(folder)
    with torch.no_grad():
        model.embeddings.cls_token.add_(0.01)
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("change", [{"train_size": 48}, {"vision_model": "perturbed"}, {"max_length": 5}],
                         ids=["data", "model", "collator"])
def test_cache_is_rebuilt_when_data_model_or_collator_change(backbones, tmp_path, tower_calls, change):
    train(tiny_config(backbones, tmp_path / "first", **QUICK))
    if change.get("vision_model") == "perturbed":
        change = {"vision_model": perturbed_vision_tower(backbones[0], tmp_path / "vision")}
    before = cache_folders(tmp_path)
    tower_calls.clear()
    train(tiny_config(backbones, tmp_path / "second", **{**QUICK, **change}))
    assert tower_calls["ViTModel"] > 0 and tower_calls["BertModel"] > 0
    after = cache_folders(tmp_path)
    changed = [name for name in after if name not in before]
    assert len(after) == len(before) + len(changed) and "train" in {name.split("-")[0] for name in changed}


def test_damaged_cache_is_refused_with_the_fix(backbones, tmp_path):
    train(tiny_config(backbones, tmp_path / "first", **QUICK))
    folder = next(p for p in (tmp_path / "feature-cache").iterdir() if p.name.startswith("train-"))
    data = bytearray((folder / FEATURES_FILE).read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    (folder / FEATURES_FILE).write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=rf"damaged .*sha256.*rm -r {folder}\) and run again to rebuild"):
        train(tiny_config(backbones, tmp_path / "second", **QUICK))


def test_training_from_the_cache_gives_the_towers_loss(backbones, tmp_path):
    losses = []
    for cached in (True, False):
        trainer = Trainer(tiny_config(backbones, tmp_path / f"run-{cached}", cache_features=cached,
                                      frozen_dropout=False, **QUICK))
        trainer.setup()
        trainer.train_mode()
        batch = next(iter(trainer.train_loader))
        with trainer.direction_schedule.step(trainer.model, 0):
            out = trainer.model(**trainer.model_inputs(batch))
        losses.append((batch["image_ids"], out.loss.detach()))
    assert torch.equal(losses[0][0], losses[1][0])  # the same (image, caption) pairs
    torch.testing.assert_close(losses[0][1], losses[1][1], rtol=1e-5, atol=1e-5)


def test_an_epoch_uses_every_caption_of_every_image(backbones, tmp_path):
    trainer = Trainer(tiny_config(backbones, tmp_path, **QUICK))
    trainer.setup()
    split = trainer.task.dataset["train"]
    captions = {row["image_id"]: row["captions"] for row in split}
    pairs = CaptionPairs(split)
    assert sorted((item["image_id"], item["captions"][0]) for item in pairs) == \
        sorted((image, caption) for image, texts in captions.items() for caption in texts)
    cached = trainer.train_loader.dataset
    assert len(cached) == len(pairs) == sum(map(len, captions.values())) > len(split)
    per_image = Counter(int(cached[i]["image_ids"]) for i in range(len(cached)))
    assert per_image == Counter({image: len(texts) for image, texts in captions.items()})
    first = [i for i in range(len(cached)) if int(cached[i]["image_ids"]) == split[0]["image_id"]]
    assert not torch.equal(cached[first[0]]["text_tokens"], cached[first[1]]["text_tokens"])  # different captions


def test_interrupted_cached_run_resumes_to_the_same_weights(backbones, tmp_path, monkeypatch):
    assert_resumes_exactly(lambda folder, **overrides: tiny_config(backbones, tmp_path / folder, **ALTMOE,
                                                                   **overrides), monkeypatch)
