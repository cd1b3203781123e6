"""The base model keeps each pretrained tower's own behaviour: padded text gives the same features as unpadded text,
whether the towers come from folders, from configs, or from a saved model."""

import pytest
import torch

from mmexperts import VisionTextModelForClassification

from conftest import bert_config, vit_config


def padded_and_unpadded(model: VisionTextModelForClassification) -> tuple[torch.Tensor, torch.Tensor]:
    """The text embedding of one 5-token sentence, alone and padded to 12 tokens in a batch with a longer one."""
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 30, 30)
    ids = torch.randint(5, 90, (2, 12))
    alone = model(pixel_values=pixels[:1], input_ids=ids[:1, :5], attention_mask=torch.ones(1, 5, dtype=torch.long))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 5:] = 0
    padded = model(pixel_values=pixels, input_ids=torch.where(mask.bool(), ids, 0), attention_mask=mask)
    return alone.text_embeds[0], padded.text_embeds[0]


@pytest.mark.parametrize("source", ["folders", "configs", "saved"])
def test_padding_does_not_change_the_text_features(source, tmp_path):
    torch.manual_seed(0)
    from transformers import BertModel, ViTModel

    ViTModel(vit_config()).save_pretrained(tmp_path / "vision")
    BertModel(bert_config()).save_pretrained(tmp_path / "text")
    model = VisionTextModelForClassification.from_vision_text_pretrained(str(tmp_path / "vision"),
                                                                         str(tmp_path / "text"), num_labels=2)
    if source == "configs":
        model = VisionTextModelForClassification.from_vision_text_configs(vit_config(), bert_config(), num_labels=2)
    elif source == "saved":
        model.save_pretrained(tmp_path / "model")
        model = VisionTextModelForClassification.from_pretrained(tmp_path / "model")
    model.eval()
    assert model.text_model.config._attn_implementation is not None
    with torch.no_grad():
        alone, padded = padded_and_unpadded(model)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)
