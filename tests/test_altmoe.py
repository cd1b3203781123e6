"""Alt-MoE-specific behaviour: outputs on CLIP / dual encoder / SigLIP, token features, init, dispatch, feature cache,
bad input. The generic PEFT behaviours of every (method, base) row are in tests/test_peft_conformance.py."""

from __future__ import annotations

import peft
import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import CLIPVisionConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

from mmexperts import AltMoEConfig, TowerDiscoveryError
from mmexperts.altmoe.features import CachedFeatures, FeatureConnector, cache_features

from conftest import ALTMOE_WIDTH as WIDTH
from conftest import HIDDEN, IMAGE_SIZE, bert_config, make_batch, make_clip, make_dual_encoder, make_siglip
from conftest import make_altmoe as make

FACTORIES = {"clip": make_clip, "dual_encoder": make_dual_encoder, "siglip": make_siglip}


def inputs(seed: int = 0) -> dict:
    return make_batch(with_labels=False, seed=seed)


def connector_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "altmoe_" in n}


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_outputs_keep_the_base_class_with_aligned_embeddings(kind):
    model = make(kind)
    base_out = FACTORIES[kind]()(**inputs())
    with torch.no_grad():
        out = model(**inputs(), return_loss=True)
    assert type(out) is type(base_out)
    assert out.image_embeds.shape == out.text_embeds.shape == (4, 2 * WIDTH)
    assert out.logits_per_image.shape == (4, 4)
    torch.testing.assert_close(out.logits_per_text, out.text_embeds @ out.image_embeds.T / 0.03)
    torch.testing.assert_close(out.logits_per_image, out.logits_per_text.T)
    assert out.vision_to_text.embeds.shape == out.text_to_vision.embeds.shape == (4, WIDTH)
    assert out.vision_to_text.latent.shape == out.text_to_vision.latent.shape == (4, HIDDEN)
    assert out.vision_target_embeds.shape == out.text_target_embeds.shape == (4, WIDTH)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.vision_to_text.routing["contrastive"].shape[-1] == 4
    assert (out.vision_to_text.routing["contrastive"] > 0).sum(-1).eq(2).all()  # top-2 of 4 experts per token
    with torch.no_grad():
        assert model(**inputs()).loss is None  # a loss only with return_loss=True


def test_token_features_are_the_mean_of_the_last_two_hidden_layers():
    model = make("clip")
    batch = inputs()
    features = model.base_model.token_features(**batch)
    base = make_clip()  # the same weights as the adapted base
    vision = base.vision_model(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states
    text = base.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states
    torch.testing.assert_close(features.image_tokens, (vision[-2] + vision[-1]) / 2)
    torch.testing.assert_close(features.text_tokens, (text[-2] + text[-1]) / 2)
    torch.testing.assert_close(features.text_mask, batch["attention_mask"])


def test_init_weights_makes_each_routed_branch_a_residual_identity():
    model = make("clip", init_weights=True)
    connector = model.base_model.connector()
    tokens = torch.randn(3, 5, WIDTH)
    real = torch.ones(3, 5, dtype=torch.bool)
    for branch in ("contrastive", "regression"):
        out, _, _ = connector._branch(tokens, real, branch)
        torch.testing.assert_close(out, tokens + connector.task_embeds[branch])
    assert not torch.equal(make("clip", init_weights=False).base_model.connector().norms["regression"].weight,
                           torch.zeros(WIDTH))


def test_sparse_and_dense_dispatch_and_the_pooled_variant():
    with torch.no_grad():
        sparse, dense = make("clip")(**inputs()), make("clip", dispatch="dense")(**inputs())
        pooled = make("clip", pooled_input=True)(**inputs())
    torch.testing.assert_close(sparse.image_embeds, dense.image_embeds, atol=1e-5, rtol=1e-5)
    assert pooled.vision_to_text.routing["contrastive"].shape == (4, 4)  # one pooled token per example
    assert not torch.allclose(pooled.image_embeds, sparse.image_embeds)


def test_training_on_cached_features_equals_running_the_towers(tmp_path):
    batch = {**inputs(), "image_ids": torch.arange(4)}
    cache_features(make("clip"), [batch], tmp_path / "features")
    cached = CachedFeatures(tmp_path / "features")
    assert len(cached) == 4 and cached.vision_hidden_size == cached.text_hidden_size == HIDDEN
    tower_model, cache_model = make("clip").train(), make("clip").train()
    results = []
    for model, run in ((tower_model, lambda m: m(**inputs(), return_loss=True)),
                       (cache_model, lambda m: FeatureConnector(m)(**CachedFeatures.collate(list(cached))))):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss = run(model).loss
        loss.backward()
        optimizer.step()
        results.append((loss.detach(), connector_params(model)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    for name, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], value, atol=1e-6, rtol=1e-6)


def test_bad_input_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4"):
        AltMoEConfig(num_experts=4, top_k=5)
    model = make("clip")
    with pytest.raises(ValueError, match="Unknown Alt-MoE direction 'image2text'.*vision_to_text"):
        with model.base_model.direction("image2text"):
            pass
    with pytest.raises(TowerDiscoveryError, match="no vision tower"):
        peft.get_peft_model(nn.Sequential(nn.Linear(2, 2)), AltMoEConfig())
    features = model.base_model.token_features(**inputs())
    bad_shape = rf"image_tokens must have shape \(batch, length, {HIDDEN}\).*got \(4, 26, 7\)"
    with pytest.raises(ValueError, match=bad_shape):
        model.base_model.connect(torch.randn(4, 26, 7), None, features.text_tokens, features.text_mask)
    model.save_pretrained(tmp_path / "adapter")
    wider = make_clip()
    wider.vision_model.config.hidden_size = 48
    with pytest.raises(ValueError, match="vision tower of hidden size 32.*has hidden size 48"):
        PeftModel.from_pretrained(wider, tmp_path / "adapter")


def test_interpolate_pos_encoding_reaches_the_vision_tower_of_a_dual_encoder():
    """VisionTextDualEncoderModel drops the option; the adapter hands it to the tower (and to its own feature pass)."""
    vision = CLIPVisionConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              image_size=IMAGE_SIZE, patch_size=6)
    torch.manual_seed(0)
    base = VisionTextDualEncoderModel(VisionTextDualEncoderConfig.from_vision_text_configs(vision, bert_config(),
                                                                                           projection_dim=16))
    batch = {**make_batch(with_labels=False), "pixel_values": torch.randn(4, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE)}
    with pytest.raises(ValueError, match="doesn't match"):
        base(**batch, interpolate_pos_encoding=True)
    model = peft.get_peft_model(base, AltMoEConfig(num_experts=4, top_k=2, hidden_size=16)).eval()
    out = model(**batch, interpolate_pos_encoding=True, return_loss=True)
    features = model.base_model.token_features(**batch, interpolate_pos_encoding=True)
    assert features.image_tokens.shape[1] == (2 * IMAGE_SIZE // 6) ** 2 + 1 and torch.isfinite(out.loss)
