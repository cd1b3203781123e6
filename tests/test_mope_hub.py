"""MoPE adapters through the Hub code paths: push (upload intercepted), load by repo id offline, model cards."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from huggingface_hub import ModelCard
from peft import AutoPeftModel, PeftModel
from safetensors.torch import load_file

from mmexperts import MoPEConfig, VisionTextModelForClassification, push_adapter_to_hub

from conftest import make_batch, make_classifier


@pytest.fixture
def trained(tmp_path):
    """A MoPE adapter with random gates over a base saved to disk (so `base_model_name_or_path` is real)."""
    make_classifier().save_pretrained(tmp_path / "base")
    base = VisionTextModelForClassification.from_pretrained(tmp_path / "base").eval()
    model = peft.get_peft_model(base, MoPEConfig(init_weights=False)).eval()
    return model, tmp_path / "base"


def test_save_writes_safetensors_and_mope_config(trained, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOPE"
    assert config["num_experts"] == 4 and config["vision_hidden_size"] == 32
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("mope_experts" in key for key in weights) and any("classifier" in key for key in weights)
    assert not (tmp_path / "adapter" / "model.safetensors").exists()


def test_push_to_hub_sends_peft_card_and_loads_back_offline(trained, fake_hub):
    model, base_dir = trained
    batch = make_batch()
    expected = model(**batch).logits

    push_adapter_to_hub(model, "someone/mope-tiny")

    (upload,) = fake_hub.uploads
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(upload["files"])
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.library_name == "peft"
    assert "mmexperts" in card.data.tags and "mope" in card.data.tags
    assert "PeftModel.from_pretrained" in card.text

    base = VisionTextModelForClassification.from_pretrained(base_dir).eval()
    loaded = PeftModel.from_pretrained(base, "someone/mope-tiny").eval()
    torch.testing.assert_close(loaded(**batch).logits, expected)

    auto = AutoPeftModel.from_pretrained("someone/mope-tiny", import_allowlist=["mmexperts"]).eval()
    torch.testing.assert_close(auto(**batch).logits, expected)


def test_unknown_repo_offline_fails_clearly(trained):
    model, base_dir = trained
    with pytest.raises(Exception, match="(?i)offline|not found|can.t find|connect"):
        PeftModel.from_pretrained(model.get_base_model(), "someone/does-not-exist")
