"""PEFT behaviours of S3 adapters on tiny two-tower models: save/load through ``PeftModel.from_pretrained`` (pruned
masks included, any adapter name, offline Hub round trip), only adapter parameters train, ``disable_adapter``, several
adapters, ``delete_adapter``, merge refusal, ``unload``, and per-call hooks cleaned up."""

from __future__ import annotations

import os
import re

import peft
import pytest
import torch
from conftest import make_batch, make_classifier, make_clip, make_dual_encoder, make_siglip
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from mmexperts import (FeatureEncoderConfig, FeatureEncoderForClassification, MMExpertsPeftType, S3Config, S3Layer,
                       S3Model, VisionTextModelForClassification, push_adapter_to_hub)


def make_features() -> FeatureEncoderForClassification:
    torch.manual_seed(0)
    return FeatureEncoderForClassification(FeatureEncoderConfig(feature_dim_a=12, feature_dim_b=10, hidden_size=16,
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
    defaults = {"num_experts": 4, "latent_dim": 16, "init_weights": False}
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


def adapter_params(model, adapter: str = "default") -> dict:
    pattern = re.compile(rf"\.{re.escape(adapter)}(\.|$)")
    return {n: p for n, p in model.named_parameters() if S3Model.prefix in n and pattern.search(n)}


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_outputs_and_registration(kind):
    model = make_s3(kind).eval()
    assert isinstance(model.base_model, S3Model)
    assert model.peft_config["default"].peft_type == MMExpertsPeftType.S3
    assert sum(isinstance(m, S3Layer) for m in model.modules()) == 2  # one token block per tower
    out = model(**inputs_for(kind))
    assert out.logits.shape == (4, 3)
    assert out.concept_embeds.shape == (4, 4, 16) and out.fused_embeds.shape == (4, 16)
    assert out.routing_weights.shape == (1, 4, 4)
    torch.testing.assert_close(out.routing_weights.sum(-1), torch.ones(1, 4))
    torch.testing.assert_close(out.loss, model.base_model.task_loss(out.logits, inputs_for(kind)["labels"])
                               + out.aux_loss)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_save_pretrained_and_from_pretrained_roundtrip(kind, tmp_path):
    model = make_s3(kind)
    train_steps(model, kind)
    expected = run(model, kind)
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(S3Model.prefix in k for k in saved), "base weights leaked into the adapter file"
    loaded = PeftModel.from_pretrained(FACTORIES[kind](), tmp_path)
    assert isinstance(loaded.peft_config["default"], S3Config)
    assert_same(run(loaded.eval(), kind), expected)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_checkpoint_loads_under_any_adapter_name(tmp_path, low_cpu_mem_usage):
    model = make_s3("dual_encoder")
    model.base_model.set_expert_mask(torch.tensor([True, True, False, True]))
    expected = run(model.eval(), "dual_encoder")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not any(".default" in k for k in saved)  # checkpoint keys do not depend on the adapter's name
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


@pytest.mark.parametrize("kind", ["classifier", "clip"])
def test_only_adapter_params_train(kind):
    model = make_s3(kind)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    model(**inputs_for(kind)).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    train_steps(model, kind, steps=2)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == (name in trainable) or "task_embedding" in name, name  # unused task rows may stay
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())


@pytest.mark.parametrize("kind", ["classifier", "dual_encoder"])
def test_disable_adapter_gives_the_base_model(kind):
    base_out = FACTORIES[kind]()(**inputs_for(kind))
    model = make_s3(kind).eval()
    adapted = run(model, kind)
    with model.disable_adapter(), torch.no_grad():
        out = model(**inputs_for(kind))
    assert out.get("concept_embeds") is None and out.get("aux_loss") is None
    for key in ("logits", "logits_per_image"):
        if out.get(key) is not None:
            torch.testing.assert_close(out[key], base_out[key])
    assert_same(run(model, kind), adapted, atol=0)


def test_init_weights_zero_heads_give_zero_logits():
    model = make_s3("classifier", init_weights=True).eval()
    with torch.no_grad():
        out = model(**inputs_for("classifier"))
    assert torch.equal(out.logits, torch.zeros(4, 3))
    assert out.concept_embeds.abs().sum() > 0  # concepts are live; only the heads start at zero


def test_several_adapters_set_and_delete():
    model = make_s3("dual_encoder").eval()
    out_default = run(model, "dual_encoder")
    model.add_adapter("other", S3Config(num_experts=3, latent_dim=8, num_labels=3, init_weights=False))
    assert_same(run(model, "dual_encoder"), out_default, atol=0)
    model.set_adapter("other")
    out_other = run(model, "dual_encoder")
    assert out_other["concept_embeds"].shape == (4, 3, 8)
    model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        both = model(**inputs_for("dual_encoder"))
    assert set(both.concept_embeds) == {"default", "other"}
    torch.testing.assert_close(both.logits, out_default["logits"] + out_other["logits"])
    model.base_model.set_adapter("default")
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names + module.other_param_names:
                assert "other" not in getattr(module, attr), attr
    assert_same(run(model, "dual_encoder"), out_default, atol=0)


def test_merge_refused_and_unload_restores_the_base(tmp_path):
    reference = make_classifier()
    model = make_s3("classifier").eval()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    assert unloaded.state_dict().keys() == reference.state_dict().keys()
    batch = inputs_for("classifier")
    torch.testing.assert_close(unloaded(**batch).logits, reference(**batch).logits)


def test_hooks_and_recorded_tokens_are_released_after_each_call():
    model = make_s3("classifier").eval()
    hooks = [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()]
    run(model, "classifier")
    assert [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()] == hooks
    context = model.base_model.context
    assert context.tokens == {} and context.inputs == {} and not context.running


def test_task_ids_never_reach_the_base_model():
    model = make_s3("clip", num_tasks=2)
    seen = {}
    model.base_model.model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    batch = inputs_for("clip")
    out = model(**batch, task_ids=torch.tensor([0, 1, 1, 0]))
    assert "task_ids" not in seen and out.logits.shape == (4, 3)


def test_bfloat16_base_with_float32_adapter():
    model = make_s3("classifier", base=make_classifier().to(torch.bfloat16)).eval()
    assert {p.dtype for n, p in model.named_parameters() if S3Model.prefix in n} == {torch.float32}
    batch = inputs_for("classifier")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


def test_push_to_hub_with_card_then_load_by_repo_id_offline(fake_hub, tmp_path):
    from huggingface_hub import ModelCard

    base_dir = tmp_path / "base"
    make_classifier().save_pretrained(base_dir)
    model = make_s3("classifier", base=VisionTextModelForClassification.from_pretrained(base_dir).eval())
    model.base_model.set_expert_mask(torch.tensor([True, False, True, True]))
    expected = run(model.eval(), "classifier")
    push_adapter_to_hub(model, "someone/s3-tiny")
    (upload,) = fake_hub.uploads
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.library_name == "peft" and {"mmexperts", "s3"} <= set(card.data.tags)
    assert "S3" in card.text and "PeftModel.from_pretrained" in card.text
    loaded = PeftModel.from_pretrained(VisionTextModelForClassification.from_pretrained(base_dir), "someone/s3-tiny")
    assert loaded.base_model.active_experts() == [0, 2, 3]
    assert_same(run(loaded.eval(), "classifier"), expected)
