"""MoPE behaviour: identity at init, conditioning in both directions, padding, routing outputs, bad input."""

from __future__ import annotations

import peft
import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import BertConfig, ViTConfig

from mmexperts import MoPEConfig, TowerDiscoveryError, VisionTextModelForClassification

from conftest import MODEL_FACTORIES, bert_config, make_batch, make_classifier, make_dual_encoder, vit_config

EMBEDDINGS = {"classifier": ("logits",), "dual_encoder": ("image_embeds", "text_embeds"),
              "clip": ("image_embeds", "text_embeds"), "siglip": ("image_embeds", "text_embeds")}


def outputs(model, batch, names):
    out = model(**batch)
    return [out[name] for name in names]


def test_trainable_share_at_vit_b_bert_base_sizes():
    base = VisionTextModelForClassification.from_vision_text_configs(ViTConfig(), BertConfig(), num_labels=101)
    backbone = sum(p.numel() for n, p in base.named_parameters() if not n.startswith("classifier"))
    model = peft.get_peft_model(base, MoPEConfig())
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all("mope_" in n or "classifier" in n for n in trainable)
    assert sum(trainable.values()) <= 0.01 * backbone


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize("tower", ["vision", "text"])
def test_prefix_identity_at_init_prompt_tokens_and_disabled_adapter(family, tower):
    batch = make_batch(with_labels=family == "classifier")
    names = EMBEDDINGS[family]
    expected = outputs(MODEL_FACTORIES[family](), batch, names)
    model = peft.get_peft_model(MODEL_FACTORIES[family](), MoPEConfig(prompted_tower=tower, prompt_mode="prefix"))
    for got, want in zip(outputs(model.eval(), batch, names), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for config in (MoPEConfig(prompted_tower=tower, prompt_mode="prefix", init_weights=False),
                   MoPEConfig(prompted_tower=tower)):  # random gates; prompt tokens (no gates)
        adapted = peft.get_peft_model(MODEL_FACTORIES[family](), config).eval()
        assert any(not torch.allclose(g, w) for g, w in zip(outputs(adapted, batch, names), expected))
        for got, want in zip(outputs(adapted, batch, names), expected):
            assert got.shape == want.shape  # prompt tokens never reach the outputs
        with adapted.disable_adapter():
            for got, want in zip(outputs(adapted, batch, names), expected):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["classifier", "dual_encoder", "clip"])
@pytest.mark.parametrize("tower", ["vision", "text"])
def test_padded_sample_matches_unpadded(family, tower):
    model = peft.get_peft_model(MODEL_FACTORIES[family](), MoPEConfig(prompted_tower=tower, init_weights=False))
    model.eval()
    batch = make_batch(with_labels=False)
    full = model(**batch)
    row, real = 3, int(batch["attention_mask"][3].sum())
    single = model(pixel_values=batch["pixel_values"][row:], input_ids=batch["input_ids"][row:, :real],
                   attention_mask=batch["attention_mask"][row:, :real])
    for name in EMBEDDINGS[family]:
        torch.testing.assert_close(single[name][0], full[name][row], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single.routing_weights[:, 0], full.routing_weights[:, row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["classifier", "dual_encoder"])
def test_token_ids_under_padding_do_not_reach_text_prompts(family):
    """With the text tower prompted, other token ids under the padding change nothing (the vision-prompted case of
    every base is in tests/test_peft_conformance.py)."""
    model = peft.get_peft_model(MODEL_FACTORIES[family](), MoPEConfig(prompted_tower="text", init_weights=False))
    model.eval()
    batch = make_batch(with_labels=False)
    padding = batch["attention_mask"] == 0
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][padding] = torch.randint(5, 99, (int(padding.sum()),),
                                                  generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(**batch), model(**changed)
    for name in EMBEDDINGS[family]:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(got.routing_weights, expected.routing_weights, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_routing_weights_and_aux_loss(tower):
    model = peft.get_peft_model(make_classifier(), MoPEConfig(prompted_tower=tower, num_experts=5, init_weights=False))
    model.train()
    batch = make_batch()
    out = model(**batch)
    assert out.routing_weights.shape == (2, 4, 5)
    torch.testing.assert_close(out.routing_weights.sum(-1), torch.ones(2, 4))
    with model.disable_adapter():
        task_loss = model(**batch).loss
    assert out.aux_loss.ndim == 0 and out.aux_loss >= 0
    # The loss carries the weighted importance loss on top of the (frozen-base) task loss.
    model.eval()
    out_eval = model(**batch)
    base_head_loss = nn.functional.cross_entropy(out_eval.logits, batch["labels"])
    torch.testing.assert_close(out_eval.loss, base_head_loss + 0.01 * out_eval.aux_loss)
    assert task_loss is not None


def test_complementary_tower_runs_once_per_call():
    model = peft.get_peft_model(make_dual_encoder(), MoPEConfig(prompted_tower="vision", init_weights=False))
    calls = []
    text_model = model.base_model.model.text_model
    handle = text_model.embeddings.register_forward_pre_hook(lambda module, args: calls.append(1))
    model(**make_batch(with_labels=False))
    handle.remove()
    assert len(calls) == 1
    assert "forward" not in text_model.__dict__


def test_routing_depends_on_the_other_modality():
    model = peft.get_peft_model(make_classifier(), MoPEConfig(init_weights=False)).eval()
    batch = make_batch(with_labels=False)
    other = dict(batch, input_ids=batch["input_ids"].flip(0), attention_mask=batch["attention_mask"].flip(0))
    assert not torch.allclose(model(**batch).routing_weights, model(**other).routing_weights)


def test_router_keys_are_frozen_buffers_and_noise_is_training_only():
    model = peft.get_peft_model(make_classifier(), MoPEConfig(init_weights=False, router_noise_std=1.0))
    router = model.base_model.model.vision_model.layers[0].mope_router["default"]
    assert "keys" in dict(router.named_buffers()) and not list(router.parameters())
    batch = make_batch(with_labels=False)
    model.eval()
    torch.testing.assert_close(model(**batch).routing_weights, model(**batch).routing_weights, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(**batch).routing_weights, model(**batch).routing_weights)


def test_routed_layers_subset_and_no_complementary_prompts():
    config = MoPEConfig(routed_layers=[1], complementary_prompt_length=0)
    model = peft.get_peft_model(make_classifier(), config)
    assert config.target_modules == ["vision_model.layers.1"]
    assert model(**make_batch()).routing_weights.shape[0] == 1
    assert "mope_mapper_in" in dict(model.base_model.model.vision_model.layers[1].named_children())


def test_without_experts_blocks_keep_static_and_mapped_prompts_only():
    model = peft.get_peft_model(make_classifier(), MoPEConfig(num_experts=0, init_weights=False))
    block = model.base_model.model.vision_model.layers[0]
    assert "default" not in block.mope_router and "default" not in block.mope_experts
    out = model(**make_batch())
    assert out.routing_weights.shape == (0, 4, 0) and out.aux_loss.item() == 0  # the same fields, nothing routed
    with model.disable_adapter():
        assert not torch.allclose(model(**make_batch()).logits, out.logits)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_experts": -1}, "num_experts"),
    ({"num_experts": 0, "static_prompt_length": 0, "mapped_prompt_length": 0}, "num_experts=0"),
    ({"prompt_length": -1}, "prompt_length"),
    ({"num_experts": 2.5}, "num_experts"), ({"static_prompt_length": -2}, "static_prompt_length"),
    ({"prompted_tower": "audio"}, "prompted_tower"), ({"router_temperature": 0}, "router_temperature"),
    ({"router_self_size": 0, "router_cross_size": 0}, "router_self_size"),
    ({"prompt_mode": "suffix"}, "prompt_mode must be one of .*'suffix'"),
])
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoPEConfig(**kwargs)


def test_attention_masks_extended_for_prompt_tokens():
    from mmexperts.prefix import extend_attention_mask

    padding = torch.tensor([[1, 1, 0]])
    assert extend_attention_mask(padding, 2).tolist() == [[1, 1, 1, 1, 0]]
    causal = torch.tril(torch.ones(3, 3, dtype=torch.bool))[None, None] & padding.bool()[:, None, None]
    extended = extend_attention_mask(causal, 2)
    assert extended.shape == (1, 1, 5, 5)
    assert extended[0, 0, 2:, :2].all()  # every real token sees the prompts
    assert torch.equal(extended[0, 0, 2:, 2:], causal[0, 0])  # and the real tokens as before
    assert extended[0, 0, :2, :2].all()  # the prompts see each other
    assert extended[0, 0, :2, 2:].tolist() == [[True, True, False]] * 2  # and every real token padding allows
    additive = torch.zeros(1, 1, 3, 3).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert torch.equal(extend_attention_mask(additive, 2) == 0, extended)
    assert extend_attention_mask(None, 2) is None
    with pytest.raises(ValueError, match="2-D or 4-D"):
        extend_attention_mask(torch.ones(1, 1, 3), 2)


def test_routed_layers_out_of_range():
    with pytest.raises(ValueError, match=r"routed_layers .*\[0, 2\)"):
        peft.get_peft_model(make_classifier(), MoPEConfig(routed_layers=[5]))


def test_model_without_towers_lists_what_it_found():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(TowerDiscoveryError, match=r"no vision tower.*top-level children \['encoder'\]"):
        peft.get_peft_model(Plain(), MoPEConfig())


def test_missing_modality_is_a_clear_error():
    model = peft.get_peft_model(make_dual_encoder(), MoPEConfig(init_weights=False))
    batch = make_batch(with_labels=False)
    with pytest.raises(ValueError, match="input_ids"):
        model.base_model.model.get_image_features(pixel_values=batch["pixel_values"])  # bypasses MoPE hooks
    with pytest.raises(ValueError, match="input_ids"):
        model(pixel_values=batch["pixel_values"])


def test_adapter_for_other_hidden_size_is_rejected(tmp_path):
    model = peft.get_peft_model(make_classifier(), MoPEConfig())
    model.save_pretrained(tmp_path)
    wider = VisionTextModelForClassification.from_vision_text_configs(
        vit_config(hidden_size=48, num_attention_heads=4), bert_config(), num_labels=3)
    with pytest.raises(ValueError, match="vision tower of hidden size 32.*hidden size 48"):
        PeftModel.from_pretrained(wider, tmp_path)


def test_adapter_with_other_expert_count_is_rejected(tmp_path):
    model = peft.get_peft_model(make_classifier(), MoPEConfig(num_experts=4))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="4 prompt experts.*num_experts=8"):
        PeftModel.from_pretrained(make_classifier(), tmp_path, config=MoPEConfig(num_experts=8))


def test_adapters_must_prompt_the_same_tower():
    model = peft.get_peft_model(make_classifier(), MoPEConfig(prompted_tower="vision"))
    with pytest.raises(ValueError, match="same tower"):
        model.add_adapter("other", MoPEConfig(prompted_tower="text"))


@pytest.mark.parametrize("tower", ["vision", "text"])
@pytest.mark.parametrize("classifier_input", ["prompted", "concat"])
def test_head_reads_the_mean_token_with_the_prompts(tower, classifier_input):
    """head_pooling='mean' (default with prompt tokens): the head reads the prompted tower's mean output token over
    the last block's prompts and the real tokens, each through the tower's final norm; 'summary' its own summary."""
    read = tower if classifier_input == "prompted" else "concat"
    base = make_classifier(classifier_input=read)
    model = peft.get_peft_model(base, MoPEConfig(prompted_tower=tower, init_weights=False, head_pooling="mean"))
    model.eval()
    assert MoPEConfig(prompted_tower=tower).head_pooling == ("mean" if tower == "vision" else "summary")
    batch = make_batch(with_labels=False)
    prompted = base.vision_model if tower == "vision" else base.text_model
    last = model.base_model.towers[tower].blocks[-1]
    kept = {}
    last.base_layer.register_forward_hook(lambda module, args, output: kept.update(
        full=(output[0] if isinstance(output, tuple) else output)))
    prompted.register_forward_hook(lambda module, args, output: kept.update(out=output))
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits
    extra = kept["full"].shape[1] - kept["out"].last_hidden_state.shape[1]
    assert extra == 13  # 6 static + 6 routed + 1 mapped
    tokens = torch.cat([kept["full"][:, :extra], kept["out"].last_hidden_state], 1)
    real = torch.ones(tokens.shape[:2])
    if tower == "text":
        real[:, extra:] = batch["attention_mask"]
    norm = base.vision_model.layernorm if tower == "vision" else nn.Identity()  # BERT's blocks end normalised
    mean = (norm(tokens) * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    # concat: the complementary tower's own summary (it has deep prompts) beside the prompted tower's mean token
    features = mean if read != "concat" else torch.cat(
        [mean, out.text_embeds] if tower == "vision" else [out.vision_embeds, mean], -1)
    torch.testing.assert_close(logits, base.classifier(features), rtol=1e-4, atol=1e-5)
    summary = peft.get_peft_model(make_classifier(classifier_input=read),
                                  MoPEConfig(prompted_tower=tower, init_weights=False, head_pooling="summary"))
    out = summary.eval()(**batch)
    torch.testing.assert_close(out.logits, summary.base_model.model.classifier(
        out.vision_embeds if read == "vision" else out.text_embeds if read == "text"
        else torch.cat([out.vision_embeds, out.text_embeds], -1)))
    with pytest.raises(ValueError, match="head_pooling"):
        MoPEConfig(head_pooling="cls")
