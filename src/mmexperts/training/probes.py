"""Single-modality baselines: linear probes on one frozen tower's pooled features."""

from __future__ import annotations

import torch
from torch import nn


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


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, multi_label: bool,
                     num_labels: int, steps: int = 300, seed: int = 0) -> torch.Tensor:
    """Fit a linear head on standardised features (full-batch AdamW) and return its logits on ``eval_x``."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std
    head = nn.Linear(train_x.shape[1], num_labels)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=1e-3)
    loss_fn = nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()
    for _ in range(steps):
        loss = loss_fn(head(train_x), train_y.float() if multi_label else train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return head(eval_x)
