"""Feature caching for Alt-MoE: the frozen towers run once per example, the connector then trains on stored features.

``cache_features`` writes every example's token features (mean of each tower's last two hidden layers), their masks
and image ids to one safetensors file, atomically; ``CachedFeatures`` reads it as a torch dataset whose batches feed
``AltMoEModel.connect`` (directly, or through ``FeatureConnector``, a module that Accelerate/DDP can wrap).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..atomic import atomic_directory
from .model import AltMoEModel, AltMoEOutput

FEATURES_FILE = "features.safetensors"
FEATURE_KEYS = ("image_tokens", "image_mask", "text_tokens", "text_mask")


def _tuner(model: nn.Module) -> AltMoEModel:
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, AltMoEModel):
        raise TypeError("Expected a PeftModel with an Alt-MoE adapter (or its AltMoEModel), got "
                        f"{type(model).__name__}.")
    return tuner


@torch.no_grad()
def cache_features(model: nn.Module, batches, path: str | os.PathLike, progress: bool = False) -> Path:
    """Run the frozen towers of ``model`` (an Alt-MoE PeftModel) over ``batches`` (collated dicts with
    ``pixel_values``, ``input_ids``, ``attention_mask`` and optionally ``image_ids``) and store the token features in
    ``path/features.safetensors``. Text is padded to the longest caption; masks mark the real tokens."""
    tuner = _tuner(model)
    was_training = tuner.model.training
    tuner.model.eval()
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in (*FEATURE_KEYS, "image_ids")}
    try:
        for batch in tqdm(batches, desc="caching tower features", disable=not progress):
            features = tuner.token_features(**{k: v for k, v in batch.items() if k != "image_ids"})
            for key in FEATURE_KEYS:
                parts[key].append(getattr(features, key).detach().cpu())
            if "image_ids" in batch:
                parts["image_ids"].append(batch["image_ids"].cpu())
    finally:
        tuner.model.train(was_training)
    if not parts["image_tokens"]:
        raise ValueError("No batches to cache: the loader is empty.")
    length = max(t.shape[1] for t in parts["text_tokens"])
    tensors = {
        "image_tokens": torch.cat(parts["image_tokens"]).float(),
        "image_mask": torch.cat(parts["image_mask"]).long(),
        "text_tokens": torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in parts["text_tokens"]]).float(),
        "text_mask": torch.cat([F.pad(m, (0, length - m.shape[1])) for m in parts["text_mask"]]).long(),
    }
    if parts["image_ids"]:
        tensors["image_ids"] = torch.cat(parts["image_ids"]).long()
    metadata = {"vision_hidden_size": str(tensors["image_tokens"].shape[-1]),
                "text_hidden_size": str(tensors["text_tokens"].shape[-1]),
                "base_model": str(getattr(tuner.model, "name_or_path", ""))}
    with atomic_directory(path) as staging:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / FEATURES_FILE), metadata=metadata)
    return Path(path)


class CachedFeatures(Dataset):
    """Cached token features as a dataset of per-example dicts; ``collate`` batches them and trims text padding."""

    def __init__(self, path: str | os.PathLike):
        file = Path(path) / FEATURES_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist; create it with cache_features(model, loader, {path!r}).")
        self.tensors = load_file(str(file))
        with safe_open(str(file), "pt") as handle:
            self.metadata = handle.metadata() or {}
        missing = [key for key in FEATURE_KEYS if key not in self.tensors]
        if missing:
            raise ValueError(f"{file} lacks {missing}; it was not written by cache_features.")

    @property
    def vision_hidden_size(self) -> int:
        return self.tensors["image_tokens"].shape[-1]

    @property
    def text_hidden_size(self) -> int:
        return self.tensors["text_tokens"].shape[-1]

    def __len__(self) -> int:
        return len(self.tensors["image_tokens"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}

    @staticmethod
    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack rows; text columns past the batch's longest real caption are dropped."""
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        length = max(int(batch["text_mask"].sum(1).max()), 1)
        batch["text_tokens"], batch["text_mask"] = batch["text_tokens"][:, :length], batch["text_mask"][:, :length]
        return batch


class FeatureConnector(nn.Module):
    """The connector of an Alt-MoE PeftModel as a module over cached features, for training loops (Accelerate, DDP):
    ``FeatureConnector(peft_model)(**cached_batch)`` returns the ``AltMoEOutput`` with its loss."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        _tuner(peft_model)
        self.peft_model = peft_model

    def forward(self, image_tokens: torch.Tensor, image_mask: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor, image_ids: torch.Tensor | None = None,
                return_loss: bool = True) -> AltMoEOutput:
        return _tuner(self.peft_model).connect(image_tokens, image_mask, text_tokens, text_mask,
                                               return_loss=return_loss)
