"""Single-modality baselines: linear probes on one frozen tower's pooled features."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch
from torch import nn

from .engine import Engine


@torch.no_grad()
def pooled_features(model: nn.Module, loader) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pooled vision and text features of a frozen ``VisionTextModelForClassification`` over a loader."""
    model.eval()
    features, labels = {"vision": [], "text": []}, []
    for batch in loader:
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        features["vision"].append(out.vision_embeds.float())
        features["text"].append(out.text_embeds.float())
        labels.append(batch["labels"])
    return {k: torch.cat(v) for k, v in features.items()}, torch.cat(labels)


class _ProbeLoss(nn.Module):
    """A linear head and its loss, as a model the training engine steps: ``(features, labels) -> .loss``."""

    def __init__(self, head: nn.Linear, multi_label: bool):
        super().__init__()
        self.head, self.multi_label = head, multi_label
        self.loss_fn = nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.loss_fn(self.head(features), labels.float() if self.multi_label else labels))


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, multi_label: bool,
                     num_labels: int, steps: int = 300, seed: int = 0) -> torch.Tensor:
    """Fit a linear head on standardised features (full-batch AdamW, ``steps`` steps of the training engine) and
    return its logits on ``eval_x``."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std
    head = nn.Linear(train_x.shape[1], num_labels)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    probe = _ProbeLoss(head, multi_label)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=1e-3)
    engine = Engine(probe, optimizer, direction_schedule=None, skip_nonfinite=False)
    engine.run(itertools.repeat({"features": train_x, "labels": train_y}), max_steps=steps)
    with torch.no_grad():
        return head(eval_x)
