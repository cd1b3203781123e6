"""The offline benchmark's tiny pretrained backbones: loadable offline, cached, written atomically, deterministic."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, BertModel, ViTModel

from mmexperts.offline import backbones as module
from mmexperts.offline.backbones import RECIPE_VERSION, PretrainedBackbones, default_cache_dir, pretrained_backbones
from mmexperts.offline.synthetic import make_scenes

STEPS = dict(vision_steps=3, text_steps=3, show_progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, PretrainedBackbones]:
    cache = tmp_path_factory.mktemp("cache")
    return cache, pretrained_backbones(cache_dir=cache, **STEPS)


def _forbid_training(monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("pretrained again although a finished build is cached")

    monkeypatch.setattr(module, "_pretrain_vision", no_training)
    monkeypatch.setattr(module, "_pretrain_text", no_training)


def _count_builds(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = module._pretrain_vision

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "_pretrain_vision", counted)
    return calls


def test_layout_and_report(built):
    cache, result = built
    folder = cache / f"{RECIPE_VERSION}-seed0-32px-vision3-text3"
    assert (result.vision, result.text) == (folder / "vision", folder / "text")
    assert json.loads((folder / "report.json").read_text()) == result.report
    assert {"vision_attribute_f1", "vision_cell_accuracy", "text_mlm_accuracy", "text_mlm_unigram_accuracy",
            "text_cls_token_accuracy",
            "seconds"} <= set(result.report)
    assert 0 <= result.report["vision_attribute_f1"] <= 1 and 0 <= result.report["text_mlm_accuracy"] <= 1
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [folder.name]


def test_vision_folder_loads_offline(built):
    _, result = built
    model, info = AutoModel.from_pretrained(result.vision, output_loading_info=True)
    assert isinstance(model, ViTModel) and model.config.model_type == "vit"
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the pooler is saved too
    processor = AutoImageProcessor.from_pretrained(result.vision)
    assert type(processor).__name__.startswith("ViTImageProcessor")
    pixels = processor([scene["image"] for scene in make_scenes(2, image_size=32)], return_tensors="pt")
    assert pixels["pixel_values"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        outputs = model(**pixels)
    assert outputs.last_hidden_state.shape == (2, 1 + 4 * 4, 64)  # [CLS] + a 4x4 grid of patches
    assert outputs.pooler_output.shape == (2, 64)
    # the processor does to an image at the model's size exactly what pretraining did
    image = make_scenes(1, image_size=32)[0]["image"]
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], module._normalise(raw))


def test_text_folder_loads_offline_and_tokenizer_round_trips(built):
    _, result = built
    model, info = AutoModel.from_pretrained(result.text, output_loading_info=True)
    assert isinstance(model, BertModel) and model.config.model_type == "bert"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(result.text)
    texts = ["a red circle is left of a blue square", "where are the white shapes"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    assert tokenizer.unk_token_id not in encoded["input_ids"].flatten().tolist()
    assert tokenizer.batch_decode(encoded["input_ids"], skip_special_tokens=True) == texts
    assert model.config.vocab_size == len(tokenizer)
    with torch.no_grad():
        outputs = model(**encoded)
    assert outputs.last_hidden_state.shape == (*encoded["input_ids"].shape, 64)


def test_second_call_returns_the_cache_without_training(built, monkeypatch):
    cache, first = built
    stamp = (first.vision / "model.safetensors").stat().st_mtime_ns
    _forbid_training(monkeypatch)
    again = pretrained_backbones(cache_dir=str(cache), **STEPS)
    assert again == first
    assert (first.vision / "model.safetensors").stat().st_mtime_ns == stamp


def test_other_steps_or_seed_are_separate_builds(built, monkeypatch):
    cache, _ = built
    _forbid_training(monkeypatch)
    with pytest.raises(AssertionError, match="pretrained again"):
        pretrained_backbones(cache_dir=cache, seed=1, **STEPS)
    assert not (cache / f"{RECIPE_VERSION}-seed1-32px-vision3-text3").exists()


def test_build_is_deterministic_and_leaves_global_rng_alone(built, tmp_path):
    _, first = built
    torch.manual_seed(123)
    state = torch.get_rng_state()
    second = pretrained_backbones(cache_dir=tmp_path, **STEPS)
    assert torch.equal(torch.get_rng_state(), state)
    for tower in ("vision", "text"):
        a = AutoModel.from_pretrained(getattr(first, tower)).state_dict()
        b = AutoModel.from_pretrained(getattr(second, tower)).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    drop = {"seconds"}
    assert {k: v for k, v in first.report.items() if k not in drop} == \
           {k: v for k, v in second.report.items() if k not in drop}


def test_interrupted_build_leaves_nothing_that_counts(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(module, "_pretrain_text", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pretrained_backbones(cache_dir=tmp_path, **STEPS)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    calls = _count_builds(monkeypatch)
    pretrained_backbones(cache_dir=tmp_path, **STEPS)
    assert calls == [1]


def test_leftover_staging_folder_is_not_a_cache_hit(built, tmp_path, monkeypatch):
    _, complete = built
    name = f"{RECIPE_VERSION}-seed0-32px-vision3-text3"
    stale = tmp_path / f".{name}.partial-999999"  # what a killed build leaves behind
    stale.mkdir()
    for tower in ("vision", "text"):
        (stale / tower).mkdir()
        (stale / tower / "config.json").write_text((getattr(complete, tower) / "config.json").read_text())
    calls = _count_builds(monkeypatch)
    result = pretrained_backbones(cache_dir=tmp_path, **STEPS)
    assert calls == [1] and result.vision == tmp_path / name / "vision"
    assert not stale.exists()  # cleaned up under the lock
    # a final-looking folder without its report is no cache either
    half = tmp_path / f"{RECIPE_VERSION}-seed0-32px-vision3-text4"
    (half / "vision").mkdir(parents=True)
    pretrained_backbones(cache_dir=tmp_path, vision_steps=3, text_steps=4, show_progress=False)
    assert calls == [1, 1] and (half / "report.json").is_file()


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = _count_builds(monkeypatch)
    results, errors = [], []

    def call():
        try:
            results.append(pretrained_backbones(cache_dir=tmp_path, **STEPS))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and calls == [1] and results[0] == results[1]


@pytest.mark.slow
def test_force_rebuilds(built, tmp_path, monkeypatch):
    pretrained_backbones(cache_dir=tmp_path, **STEPS)
    calls = _count_builds(monkeypatch)
    pretrained_backbones(cache_dir=tmp_path, force=True, **STEPS)
    assert calls == [1] and [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == \
        [f"{RECIPE_VERSION}-seed0-32px-vision3-text3"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MMEXPERTS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "backbones"
    monkeypatch.delenv("MMEXPERTS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "mmexperts" / "backbones"


@pytest.mark.parametrize("kwargs, message", [
    ({"vision_steps": 0}, "vision_steps must be an integer >= 1, got 0"),
    ({"text_steps": -5}, "text_steps must be an integer >= 1, got -5"),
    ({"vision_steps": 2.5}, "vision_steps must be an integer >= 1, got 2.5"),
    ({"image_size": 8}, "image_size must be an integer >= 16 pixels, got 8"),
    ({"image_size": "32"}, "image_size must be an integer >= 16 pixels, got '32'"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pretrained_backbones(cache_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
