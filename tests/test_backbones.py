"""The offline benchmark's tiny pretrained backbones: loadable offline, cached, written atomically."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from mmexperts.data import backbones as module
from mmexperts.data.backbones import pretrained_backbones
from mmexperts.data.synthetic import make_scenes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, pretrained_backbones(cache_dir=cache, vision_steps=3, text_steps=3, show_progress=False)


def test_folders_load_offline_with_auto_classes(built):
    _, result = built
    vision, processor = AutoModel.from_pretrained(result.vision), AutoImageProcessor.from_pretrained(result.vision)
    text, tokenizer = AutoModel.from_pretrained(result.text), AutoTokenizer.from_pretrained(result.text)
    assert vision.config.model_type == "vit" and text.config.model_type == "bert"
    pixels = processor([make_scenes(1, image_size=32)[0]["image"]], return_tensors="pt")["pixel_values"]
    tokens = (32 // vision.config.patch_size) ** 2 + 1
    assert vision(pixel_values=pixels).last_hidden_state.shape == (1, tokens, 64)
    encoded = tokenizer(["a red circle is left of a blue square"], return_tensors="pt")
    assert tokenizer.unk_token_id not in encoded["input_ids"][0].tolist()
    assert text(**encoded).last_hidden_state.shape[-1] == 64
    assert set(result.report) >= {"vision_cell_attribute_f1", "text_mlm_accuracy"}


def test_second_call_uses_the_cache(built, monkeypatch):
    cache, first = built

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache was complete")

    monkeypatch.setattr(module, "_pretrain_vision", no_training)
    again = pretrained_backbones(cache_dir=cache, vision_steps=3, text_steps=3, show_progress=False)
    assert again == first


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_pretrain_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrained_backbones(cache_dir=tmp_path, vision_steps=2, text_steps=2, show_progress=False)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


@pytest.mark.parametrize("kwargs, message", [({"vision_steps": 0}, "vision_steps must be >= 1, got 0"),
                                             ({"image_size": 8}, "image_size must be >= 16")])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pretrained_backbones(cache_dir=tmp_path, **kwargs)
