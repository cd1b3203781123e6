"""A seeded fusion task whose label needs both modalities: MoPE learns it, single-modality probes cannot."""

from __future__ import annotations

import peft
import pytest
import torch

from mmexperts import MoPEConfig

from conftest import IMAGE_SIZE, make_classifier

TOKEN_A, TOKEN_B = 10, 11


def xor_task(num: int, seed: int) -> dict:
    """Image: a red- or blue-tinted noisy picture; text: token A or B, then random fillers, variably padded.
    Label: (image is red) XOR (text holds token A); each modality alone is uninformative."""
    g = torch.Generator().manual_seed(seed)
    red = torch.randint(0, 2, (num,), generator=g)
    has_a = torch.randint(0, 2, (num,), generator=g)
    pixels = torch.randn(num, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 0.5
    pixels[:, 0] += 1.5 * red[:, None, None]
    pixels[:, 2] += 1.5 * (1 - red)[:, None, None]
    lengths = torch.randint(3, 8, (num,), generator=g)
    input_ids = torch.randint(20, 99, (num, 8), generator=g)
    attention_mask = (torch.arange(8)[None] < lengths[:, None]).long()
    input_ids[:, 0] = torch.where(has_a.bool(), TOKEN_A, TOKEN_B)
    input_ids[attention_mask == 0] = 0
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": attention_mask,
            "labels": red ^ has_a}


def train_and_score(model, steps: int = 150, lr: float = 3e-3) -> float:
    torch.manual_seed(0)
    train, test = xor_task(512, seed=1), xor_task(256, seed=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        rows = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(step))
        loss = model(**{k: v[rows] for k, v in train.items()}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in test.items() if k != "labels"}).logits
    return (logits.argmax(-1) == test["labels"]).float().mean().item()


def frozen_probe(classifier_input: str):
    model = make_classifier(num_labels=2, classifier_input=classifier_input)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("classifier")
    return model


@pytest.mark.parametrize("tower", ["vision", "text"])
@pytest.mark.slow
def test_mope_learns_a_task_that_needs_both_modalities(tower):
    model = peft.get_peft_model(make_classifier(num_labels=2, classifier_input=tower),
                                MoPEConfig(prompted_tower=tower, prompt_dropout=0.0))
    assert train_and_score(model) >= 0.9


@pytest.mark.parametrize("classifier_input", ["vision", "text", "concat"])
def test_frozen_unimodal_and_late_fusion_probes_stay_near_chance(classifier_input):
    assert train_and_score(frozen_probe(classifier_input)) <= 0.7
