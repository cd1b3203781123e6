"""S3-specific PEFT behaviours: its outputs and loss, pruned expert masks through save/load (any adapter name,
``low_cpu_mem_usage``, ``set_peft_model_state_dict``), zero-init heads, several active adapters (per-adapter concepts,
summed logits), task ids, and the feature-encoder base. The generic PEFT behaviours of every (method, base) row are in
tests/test_peft_conformance.py."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from mmexperts import (
    FeatureEncoderConfig,
    FeatureEncoderForClassification,
    MMExpertsPeftType,
    S3Config,
    S3Layer,
    S3Model,
)

from conftest import make_batch, make_classifier, make_clip, make_dual_encoder, make_siglip


def make_features() -> FeatureEncoderForClassification:
    torch.manual_seed(0)
    return FeatureEncoderForClassification(FeatureEncoderConfig(feature_size_a=12, feature_size_b=10, hidden_size=16,
                                                                num_labels=3)).eval()


FACTORIES = {"classifier": make_classifier, "dual_encoder": make_dual_encoder, "clip": make_clip,
             "siglip": make_siglip, "features": make_features}
ALL_KINDS = list(FACTORIES)
KEYS = ("logits", "concept_embeds", "fused_embeds", "routing_weights")


def inputs_for(kind: str, seed: int = 0) -> dict:
    """A padded batch for ``kind``; every kind gets labels for S3's head (headless bases: S3 heads of 3 classes)."""
    if kind == "features":
        generator = torch.Generator().manual_seed(seed)
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[2:, 4:] = 0
        return {"features_a": torch.randn(4, 6, 12, generator=generator),
                "features_b": torch.randn(4, 5, 10, generator=generator), "attention_mask_a": mask,
                "labels": torch.tensor([0, 1, 2, 1])}
    return make_batch(seed=seed)


def make_s3(kind: str, seed: int = 0, adapter_name: str = "default", base=None, **kwargs) -> PeftModel:
    base = FACTORIES[kind]() if base is None else base
    torch.manual_seed(seed)
    defaults = {"design": "concepts", "num_experts": 4, "latent_size": 16, "init_weights": False}
    if kind in ("dual_encoder", "clip", "siglip"):
        defaults["num_labels"] = 3
    return get_peft_model(base, S3Config(**{**defaults, **kwargs}), adapter_name=adapter_name)


@torch.no_grad()
def run(model, kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    out = model(**inputs_for(kind, seed))
    return {k: out[k].detach().clone() for k in KEYS if isinstance(out.get(k), torch.Tensor)}


def assert_same(a: dict, b: dict, atol: float = 1e-6):
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def train_steps(model, kind: str, steps: int = 3, lr: float = 0.1) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        model(**inputs_for(kind, seed=step)).loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_outputs_and_loss(kind):
    model = make_s3(kind).eval()
    out = model(**inputs_for(kind))
    assert out.logits.shape == (4, 3)
    assert out.concept_embeds.shape == (4, 4, 16) and out.fused_embeds.shape == (4, 16)
    assert out.routing_weights.shape == (1, 4, 4)
    torch.testing.assert_close(out.routing_weights.sum(-1), torch.ones(1, 4))
    torch.testing.assert_close(out.loss, model.base_model.task_loss(out.logits, inputs_for(kind)["labels"])
                               + out.aux_loss)


def test_feature_encoder_base_registers_and_round_trips(tmp_path):
    """The feature-sequence base is not a row of the conformance battery: registration and save/load here."""
    model = make_s3("features")
    assert isinstance(model.base_model, S3Model)
    assert model.peft_config["default"].peft_type == MMExpertsPeftType.S3
    assert sum(isinstance(m, S3Layer) for m in model.modules()) == 2  # one token block per tower
    train_steps(model, "features")
    expected = run(model, "features")
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(S3Model.prefix in k for k in saved), "base weights leaked into the adapter file"
    loaded = PeftModel.from_pretrained(make_features(), tmp_path)
    assert isinstance(loaded.peft_config["default"], S3Config)
    assert_same(run(loaded.eval(), "features"), expected)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_expert_mask_loads_under_any_adapter_name(tmp_path, low_cpu_mem_usage):
    model = make_s3("dual_encoder")
    model.base_model.set_expert_mask(torch.tensor([True, True, False, True]))
    expected = run(model.eval(), "dual_encoder")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_dual_encoder(), tmp_path, adapter_name="first",
                                       low_cpu_mem_usage=low_cpu_mem_usage)
    result = loaded.load_adapter(tmp_path, adapter_name="second", low_cpu_mem_usage=low_cpu_mem_usage)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    for name in ("first", "second"):
        loaded.set_adapter(name)
        assert loaded.base_model.active_experts() == [0, 1, 3]
        assert_same(run(loaded.eval(), "dual_encoder"), expected)


def test_prune_save_load_keeps_outputs_and_active_experts(tmp_path):
    model = make_s3("classifier", num_experts=6)
    train_steps(model, "classifier")
    model.base_model.set_expert_mask(torch.tensor([True, False, True, True, False, True]))
    expected = run(model, "classifier")
    assert (expected["concept_embeds"][:, [1, 4]] == 0).all()  # pruned experts are zeroed
    state = get_peft_model_state_dict(model)
    mask_keys = [k for k in state if "s3_expert_mask" in k]
    assert len(mask_keys) == 1 and state[mask_keys[0]].tolist() == [True, False, True, True, False, True]
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_classifier(), tmp_path)
    assert loaded.base_model.active_experts() == [0, 2, 3, 5]
    assert_same(run(loaded.eval(), "classifier"), expected)

    fresh = make_s3("classifier", num_experts=6, seed=1)  # set_peft_model_state_dict carries the mask as well
    set_peft_model_state_dict(fresh, state)
    assert fresh.base_model.active_experts() == [0, 2, 3, 5]
    assert_same(run(fresh.eval(), "classifier"), expected)


def test_init_weights_zero_heads_give_zero_logits():
    model = make_s3("classifier", init_weights=True).eval()
    with torch.no_grad():
        out = model(**inputs_for("classifier"))
    assert torch.equal(out.logits, torch.zeros(4, 3))
    assert out.concept_embeds.abs().sum() > 0  # concepts are live; only the heads start at zero


def test_two_active_adapters_keep_their_concepts_and_sum_their_logits():
    model = make_s3("dual_encoder").eval()
    out_default = run(model, "dual_encoder")
    model.add_adapter("other", S3Config(design="concepts", num_experts=3, latent_size=8, num_labels=3,
                                        init_weights=False))
    model.set_adapter("other")
    out_other = run(model, "dual_encoder")
    assert out_other["concept_embeds"].shape == (4, 3, 8)
    model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        both = model(**inputs_for("dual_encoder"))
    assert set(both.concept_embeds) == {"default", "other"}
    torch.testing.assert_close(both.logits, out_default["logits"] + out_other["logits"])
    for name, expected in (("default", out_default), ("other", out_other)):
        torch.testing.assert_close(both.concept_embeds[name], expected["concept_embeds"])


def test_task_ids_never_reach_the_base_model():
    model = make_s3("clip", num_tasks=2)
    seen = {}
    model.base_model.model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    batch = inputs_for("clip")
    out = model(**batch, task_ids=torch.tensor([0, 1, 1, 0]))
    assert "task_ids" not in seen and out.logits.shape == (4, 3)
