"""Tower discovery (``mmexperts.towers``): the known two-tower layouts, each tower's blocks, width, inputs, pooling and
final norm, nested and config-less towers, the self-attention anatomy of a block, tower options, the padding helpers,
and the errors that list what was found."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, ViTModel
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.vit.modeling_vit import ViTLayer

from mmexperts import FeatureEncoderConfig, FeatureEncoderForClassification, TowerDiscoveryError, find_towers
from mmexperts.towers import block_anatomy, key_padding_mask, masked_mean, tower_options

from conftest import (
    HIDDEN,
    IMAGE_SIZE,
    MODEL_FACTORIES,
    bert_config,
    make_batch,
    make_clip,
    make_dual_encoder,
    vit_config,
)

# (vision pooling, text pooling, text inputs) of each layout: CLIP and SigLIP define their summary as `pooler_output`,
# ViT and BERT towers are summarised by their [CLS] token.
LAYOUTS = {
    "classifier": ("cls", "cls", ("input_ids", "attention_mask", "token_type_ids", "position_ids")),
    "dual_encoder": ("cls", "cls", ("input_ids", "attention_mask", "token_type_ids", "position_ids")),
    "clip": ("pooler", "pooler", ("input_ids", "attention_mask", "position_ids")),
    "siglip": ("pooler", "pooler", ("input_ids", "attention_mask", "position_ids")),
}


def name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    """The qualified name of ``module`` inside ``model`` (None for None)."""
    return None if module is None else next(name for name, child in model.named_modules() if child is module)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_known_layout_exposes_both_towers_blocks_width_inputs_and_pooling(layout):
    model = MODEL_FACTORIES[layout]()
    towers = find_towers(model)
    assert set(towers) == {"vision", "text"}
    vision_pooling, text_pooling, text_inputs = LAYOUTS[layout]
    for modality, pooling, inputs in (("vision", vision_pooling, ("pixel_values", "interpolate_pos_encoding")),
                                      ("text", text_pooling, text_inputs)):
        tower = towers[modality]
        assert tower.modality == modality and tower.path == f"{modality}_model"
        assert tower.module is model.get_submodule(tower.path)
        assert tower.blocks is model.get_submodule(tower.blocks_path) and len(tower.blocks) == 2
        assert tower.blocks_path.startswith(f"{tower.path}.")
        assert [model.get_submodule(name) for name in tower.block_names] == list(tower.blocks)
        assert tower.hidden_size == HIDDEN
        assert tower.input_names == inputs
        assert tower.pooling == pooling


@pytest.mark.parametrize("layout, vision_norm, text_norm", [
    ("classifier", "vision_model.layernorm", None),  # BERT's blocks end in their own layer norm
    ("clip", "vision_model.post_layernorm", "text_model.final_layer_norm"),
])
def test_final_norm_is_the_norm_the_tower_applies_after_its_last_block(layout, vision_norm, text_norm):
    model = MODEL_FACTORIES[layout]()
    towers = find_towers(model)
    assert name_of(model, towers["vision"].final_norm) == vision_norm
    assert name_of(model, towers["text"].final_norm) == text_norm
    # a pooler-pooled tower keeps the norm of its summary (CLIP vision: post_layernorm over [CLS]); others none
    expected_summary = vision_norm if towers["vision"].pooling == "pooler" else None
    assert name_of(model, towers["vision"].summary_norm) == expected_summary


def test_pool_gives_clips_post_layernorm_cls_and_berts_last_layer_cls():
    batch = make_batch(with_labels=False)
    clip_vision = find_towers(make_clip())["vision"]
    bert = find_towers(make_dual_encoder())["text"]
    with torch.no_grad():
        out = clip_vision.module(pixel_values=batch["pixel_values"])
        torch.testing.assert_close(clip_vision.pool(out), clip_vision.summary_norm(out.last_hidden_state[:, 0]))
        torch.testing.assert_close(clip_vision.pool(out), out.pooler_output)
        out = bert.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.testing.assert_close(bert.pool(out), out.last_hidden_state[:, 0])
        assert not torch.allclose(bert.pool(out), out.pooler_output)  # not BERT's tanh next-sentence pooler


def test_select_inputs_takes_only_the_towers_tensors_and_skips_missing_ones():
    batch = {**make_batch(), "token_type_ids": None, "interpolate_pos_encoding": True}
    bert_model = find_towers(make_dual_encoder())
    assert set(bert_model["vision"].select_inputs(batch)) == {"pixel_values", "interpolate_pos_encoding"}
    assert set(bert_model["text"].select_inputs(batch)) == {"input_ids", "attention_mask"}  # no labels, no None
    assert bert_model["text"].select_inputs(batch)["input_ids"] is batch["input_ids"]
    clip_text = find_towers(make_clip())["text"]  # CLIP's text tower takes no token_type_ids
    assert set(clip_text.select_inputs({**batch, "token_type_ids": torch.zeros(4, 9)})) == {"input_ids",
                                                                                            "attention_mask"}


def test_a_call_carrying_only_tower_options_has_none_of_the_towers_inputs():
    vision = find_towers(make_dual_encoder())["vision"]
    text_only = {"input_ids": torch.ones(2, 3, dtype=torch.long), "interpolate_pos_encoding": True}
    assert vision.select_inputs(text_only) == {}
    assert vision.select_inputs({"pixel_values": None, "interpolate_pos_encoding": True}) == {}


def test_tower_options_reach_the_vision_tower_only_inside_the_context_and_the_calls_own_value_wins():
    model = make_dual_encoder()  # its forward drops interpolate_pos_encoding
    towers = find_towers(model)
    vision = towers["vision"].module
    pixels = torch.randn(2, 3, IMAGE_SIZE + 12, IMAGE_SIZE + 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vision(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        with tower_options(towers, {"pixel_values": pixels, "interpolate_pos_encoding": True}):
            torch.testing.assert_close(vision(pixel_values=pixels).last_hidden_state, expected)
            with pytest.raises(ValueError, match="doesn't match"):
                vision(pixel_values=pixels, interpolate_pos_encoding=False)
        with pytest.raises(ValueError, match="doesn't match"):  # the hook is gone
            vision(pixel_values=pixels)
        with tower_options(towers, {"interpolate_pos_encoding": None}):  # None hands nothing over
            with pytest.raises(ValueError, match="doesn't match"):
                vision(pixel_values=pixels)


def test_towers_one_level_down_are_found_under_their_full_paths():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_encoder, self.text_encoder = ViTModel(vit_config()), BertModel(bert_config())

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    torch.manual_seed(0)
    model = Wrapper()
    towers = find_towers(model)
    assert (towers["vision"].path, towers["text"].path) == ("model.vision_encoder", "model.text_encoder")
    assert towers["vision"].module is model.model.vision_encoder
    assert towers["text"].blocks is model.get_submodule(towers["text"].blocks_path)
    assert towers["text"].blocks_path == "model.text_encoder.encoder.layer"

    class Deeper(nn.Module):
        def __init__(self):
            super().__init__()
            self.outer = Wrapper()

    with pytest.raises(TowerDiscoveryError, match="no vision tower"):  # two levels down is not a known layout
        find_towers(Deeper())


def test_a_tower_without_config_takes_its_width_from_its_first_blocks_query_and_inputs_from_its_signature():
    class ConfiglessTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(ViTLayer(vit_config(hidden_size=24)) for _ in range(3))

        def forward(self, pixel_values):
            return pixel_values

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model, self.text_model = ConfiglessTower(), BertModel(bert_config())

    towers = find_towers(Model())
    assert towers["vision"].hidden_size == 24 and towers["text"].hidden_size == HIDDEN
    assert towers["vision"].input_names == ("pixel_values",) and len(towers["vision"].blocks) == 3
    assert towers["vision"].pooling == "cls" and towers["vision"].final_norm is None


def test_feature_encoders_put_modality_a_in_the_vision_slot_and_modality_b_in_the_text_slot():
    torch.manual_seed(0)
    model = FeatureEncoderForClassification(FeatureEncoderConfig(feature_size_a=6, feature_size_b=5, hidden_size=16,
                                                                 num_hidden_layers=3))
    towers = find_towers(model)
    assert (towers["vision"].module, towers["text"].module) == (model.modality_a_model, model.modality_b_model)
    assert [t.blocks_path for t in towers.values()] == ["modality_a_model.layers", "modality_b_model.layers"]
    assert all(t.hidden_size == 16 and len(t.blocks) == 3 and t.pooling == "cls" for t in towers.values())


def test_an_unknown_layout_raises_a_value_error_listing_what_it_found():
    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
            self.head = nn.Linear(4, 2)

    with pytest.raises(TowerDiscoveryError) as caught:
        find_towers(Unknown())
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert message.startswith("Could not find the vision and text towers of Unknown")
    assert "no vision tower under any of ['vision_model'" in message and "no text tower under any of" in message
    assert "top-level children ['encoder', 'head']" in message and "module lists ['encoder (2 x Linear)']" in message
    assert "VisionTextModelForClassification" in message and "`vision_model` and `text_model`" in message


def test_a_tower_without_a_block_list_is_named_with_the_paths_that_were_tried():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model, self.text_model = nn.Linear(4, 4), BertModel(bert_config())

    with pytest.raises(TowerDiscoveryError, match=r"vision tower 'vision_model' \(Linear\) has no block list at any "
                                                  r"of \['layers', 'encoder.layers', 'encoder.layer'") as caught:
        find_towers(NoBlocks())
    assert "no text tower" not in str(caught.value) and "text tower 'text_model'" not in str(caught.value)


@pytest.mark.parametrize("layout", ["classifier", "clip"])
def test_block_anatomy_finds_each_blocks_self_attention(layout):
    towers = find_towers(MODEL_FACTORIES[layout]())
    for modality, tower in towers.items():
        for block in tower.blocks:
            anatomy = block_anatomy(block)
            assert anatomy.num_heads == 4 and anatomy.head_dim == HIDDEN // 4
            assert anatomy.scaling == pytest.approx((HIDDEN // 4) ** -0.5)
            attention_modules = list(anatomy.attention.children())
            assert all(p in attention_modules for p in (anatomy.query, anatomy.key, anatomy.value))
            assert anatomy.query.in_features == anatomy.query.out_features == HIDDEN
            if layout == "classifier" and modality == "text":  # BERT: post-norm, projection outside the attention
                assert anatomy.output is None and anatomy.pre_norm is None
            else:
                assert isinstance(anatomy.output, nn.Linear) and isinstance(anatomy.pre_norm, nn.LayerNorm)
                assert anatomy.pre_norm in list(block.children())


def test_block_anatomy_never_takes_cross_attention_for_self_attention():
    config = BertConfig(**{**bert_config().to_dict(), "is_decoder": True, "add_cross_attention": True})

    class CrossFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.crossattention = BertSelfAttention(config)  # registered before the self-attention
            self.attention = BertSelfAttention(config)

    block = CrossFirst()
    assert block_anatomy(block).attention is block.attention


def test_a_block_without_self_attention_raises_naming_its_children():
    with pytest.raises(TowerDiscoveryError, match=r"Block Sequential has no recognisable self-attention .*"
                                                  r"children: \['0', '1'\]"):
        block_anatomy(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_key_padding_mask_reads_2d_and_4d_bool_or_additive_masks():
    padding = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    expected = padding.bool()
    assert torch.equal(key_padding_mask(None, 4, 2, "cpu"), torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(key_padding_mask(padding, 4, 2, "cpu"), expected)
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None] & expected[:, None, None, :]
    assert torch.equal(key_padding_mask(causal, 4, 2, "cpu"), expected)  # the last row, not the causal first row
    for dtype in (torch.float32, torch.bfloat16):
        additive = torch.zeros(2, 1, 4, 4, dtype=dtype).masked_fill(~causal, torch.finfo(dtype).min)
        assert torch.equal(key_padding_mask(additive, 4, 2, "cpu"), expected)
    broadcast = torch.zeros(2, 1, 1, 4).masked_fill(~expected[:, None, None, :], torch.finfo(torch.float32).min)
    assert torch.equal(key_padding_mask(broadcast, 4, 2, "cpu"), expected)


def test_masked_mean_averages_real_tokens_only_and_an_all_padding_row_gives_zeros():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 4, 5, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    poisoned = tokens.masked_fill(~mask.bool()[..., None], 1e6)  # padding values never leak
    for given in (mask, mask.bool()):
        mean = masked_mean(poisoned, given)
        assert mean.shape == (3, 5)
        torch.testing.assert_close(mean[0], tokens[0].mean(0))
        torch.testing.assert_close(mean[1], tokens[1, :2].mean(0))
        assert torch.equal(mean[2], torch.zeros(5))


def test_a_model_can_name_its_towers_inputs_under_other_names_than_the_towers_own():
    torch.manual_seed(0)
    model = FeatureEncoderForClassification(FeatureEncoderConfig(feature_size_a=6, feature_size_b=5, hidden_size=16))
    towers = find_towers(model)
    assert towers["vision"].input_names == ("features_a", "attention_mask_a")
    assert towers["text"].input_names == ("features_b", "attention_mask_b")
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    call = {"features_a": torch.randn(2, 3, 6), "features_b": torch.randn(2, 4, 5), "attention_mask_b": mask}
    assert set(towers["vision"].select_inputs(call)) == {"features"}
    selected = towers["text"].select_inputs(call)
    assert selected.keys() == {"features", "attention_mask"} and selected["attention_mask"] is mask
    with torch.no_grad():  # the tower run on its selected inputs is the tower the model runs
        alone = towers["text"].module(**selected).pooler_output
        assert torch.equal(alone, model(**call).modality_b_embeds)
    assert towers["vision"].select_inputs({"features_b": call["features_b"]}) == {}
