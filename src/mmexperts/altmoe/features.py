"""Feature caching for Alt-MoE: the frozen towers run once per example, the connector then trains on stored features.

``cache_features`` writes every example's token features (mean of each tower's last two hidden layers), their masks
and image ids to one safetensors file, atomically, with the sha256 of each tensor in its metadata (``write_features``
writes any such set, e.g. each image once and several captions per image, ``text_rows`` naming each caption's image);
``CachedFeatures`` checks and reads it as a torch dataset of (image, caption) pairs whose batches feed
``AltMoEModel.connect`` (directly, or through ``FeatureConnector``, a module that Accelerate/DDP can wrap).

The file format and ``FeatureConnector`` serve any tuner with ``connect``: a labelled task's cache (S3) also holds
each example's ``labels`` (class ids (N,) int64, or multi-hot (N, C) float32) and optionally ``task_ids``, which
batches carry and ``FeatureConnector`` hands to ``connect``.
"""

from __future__ import annotations

import inspect
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..atomic import atomic_directory
from ..checksums import tensor_sha256
from ..errors import CorruptFileError
from .model import AltMoEModel
from .outputs import AltMoEOutput

FEATURES_FILE = "features.safetensors"
FEATURE_KEYS = ("image_tokens", "image_mask", "text_tokens", "text_mask")
# dtype and number of dimensions of each cached tensor, as cache_features writes them
FEATURE_LAYOUT = {"image_tokens": (torch.float32, 3), "image_mask": (torch.int64, 2), "text_tokens": (torch.float32, 3),
                  "text_mask": (torch.int64, 2), "image_ids": (torch.int64, 1), "text_rows": (torch.int64, 1)}
# per-example tensors of a labelled task's cache, with their accepted (dtype, number of dimensions)
EXAMPLE_LAYOUTS = {"labels": ((torch.int64, 1), (torch.float32, 2)), "task_ids": ((torch.int64, 1),)}
IMAGE_KEYS, TEXT_KEYS = ("image_tokens", "image_mask", "image_ids"), ("text_tokens", "text_mask", "text_rows")
EXAMPLE_KEYS = tuple(EXAMPLE_LAYOUTS)  # read with each example's image row
RECREATE = "recreate the cache with cache_features(model, loader, path)"


def _tuner(model: nn.Module) -> AltMoEModel:
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, AltMoEModel):
        raise TypeError("Expected a PeftModel with an Alt-MoE adapter (or its AltMoEModel), got "
                        f"{type(model).__name__}.")
    return tuner


@contextmanager
def towers_in_eval(tuner):
    """The tuner's model in evaluation mode (no tower dropout) while features are cached; its mode restored after."""
    was_training = tuner.model.training
    tuner.model.eval()
    try:
        yield
    finally:
        tuner.model.train(was_training)


def padded_text(tokens: list[torch.Tensor], masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Batches of text token features (batch, length, dim) and their masks, padded to the longest and stacked:
    ``text_tokens`` (float32) and ``text_mask`` (int64, 0 on padding)."""
    length = max(t.shape[1] for t in tokens)
    return {"text_tokens": torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in tokens]).float(),
            "text_mask": torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks]).long()}


@torch.no_grad()
def cache_features(model: nn.Module, batches, path: str | os.PathLike, progress: bool = False,
                   metadata: dict[str, str] | None = None) -> Path:
    """Run the frozen towers of ``model`` (an Alt-MoE PeftModel) over ``batches`` (collated dicts with
    ``pixel_values``, ``input_ids``, ``attention_mask`` and optionally ``image_ids``) and store the token features in
    ``path/features.safetensors``. Text is padded to the longest caption; masks mark the real tokens."""
    tuner = _tuner(model)
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in (*FEATURE_KEYS, "image_ids")}
    with towers_in_eval(tuner):
        for batch in tqdm(batches, desc="caching tower features", disable=not progress):
            features = tuner.token_features(**{k: v for k, v in batch.items() if k != "image_ids"})
            for key in FEATURE_KEYS:
                parts[key].append(getattr(features, key).detach().cpu())
            if "image_ids" in batch:
                parts["image_ids"].append(batch["image_ids"].cpu())
    if not parts["image_tokens"]:
        raise ValueError("No batches to cache: the loader is empty.")
    tensors = {"image_tokens": torch.cat(parts["image_tokens"]).float(),
               "image_mask": torch.cat(parts["image_mask"]).long(),
               **padded_text(parts["text_tokens"], parts["text_mask"])}
    if parts["image_ids"]:
        tensors["image_ids"] = torch.cat(parts["image_ids"]).long()
    return write_features(tensors, path, {"base_model": str(getattr(tuner.model, "name_or_path", "")),
                                          **(metadata or {})})


def write_features(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write cached features (the tensors of ``FEATURE_LAYOUT``, and of ``EXAMPLE_LAYOUTS`` for labelled tasks) to
    ``path/features.safetensors`` atomically, with the hidden sizes and the sha256 of every tensor in the metadata;
    the result is checked before it is swapped in."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    metadata = {**(metadata or {}), "vision_hidden_size": str(tensors["image_tokens"].shape[-1]),
                "text_hidden_size": str(tensors["text_tokens"].shape[-1]),
                "sha256": json.dumps({key: tensor_sha256(value) for key, value in tensors.items()})}
    with atomic_directory(path) as staging:
        _check_cache(staging / FEATURES_FILE, tensors, metadata)
        save_file(tensors, str(staging / FEATURES_FILE), metadata=metadata)
    return Path(path)


class CachedFeatures(Dataset):
    """Cached token features as a dataset of (image, caption) pairs, one per cached caption (a caption's image is
    ``text_rows[i]``, or row ``i`` when the cache has no ``text_rows``); ``collate`` batches them and trims text
    padding."""

    def __init__(self, path: str | os.PathLike):
        file = Path(path) / FEATURES_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist; create it with cache_features(model, loader, {path!r}).")
        try:
            self.tensors = load_file(str(file))
            with safe_open(str(file), "pt") as handle:
                self.metadata = handle.metadata() or {}
        except (SafetensorError, ValueError, TypeError, KeyError, RuntimeError) as error:
            raise CorruptFileError(file, f"Not a readable safetensors file ({error}); {RECREATE}.") from error
        _check_cache(file, self.tensors, self.metadata)

    @property
    def vision_hidden_size(self) -> int:
        return self.tensors["image_tokens"].shape[-1]

    @property
    def text_hidden_size(self) -> int:
        return self.tensors["text_tokens"].shape[-1]

    @property
    def num_images(self) -> int:
        return len(self.tensors["image_tokens"])

    def __len__(self) -> int:
        return len(self.tensors["text_tokens"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rows = self.tensors.get("text_rows")
        image = index if rows is None else int(rows[index])
        item = {key: self.tensors[key][image] for key in IMAGE_KEYS + EXAMPLE_KEYS if key in self.tensors}
        item.update({key: self.tensors[key][index] for key in ("text_tokens", "text_mask")})
        return item

    @staticmethod
    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack rows; text columns past the batch's longest real caption are dropped."""
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        length = max(int(batch["text_mask"].sum(1).max()), 1)
        batch["text_tokens"], batch["text_mask"] = batch["text_tokens"][:, :length], batch["text_mask"][:, :length]
        return batch


def _check_cache(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Refuse a cache whose tensors are missing, misshapen or differ from the sha256 sums in its metadata."""
    missing = [key for key in FEATURE_KEYS if key not in tensors]
    unknown = sorted(set(tensors) - set(FEATURE_LAYOUT) - set(EXAMPLE_LAYOUTS))
    if missing or unknown:
        raise CorruptFileError(file, f"Missing the tensors {missing}, unexpected {unknown}; expected "
                                     f"{list(FEATURE_KEYS)} (+ image_ids), {RECREATE}.")
    for key, tensor in tensors.items():
        layouts = EXAMPLE_LAYOUTS.get(key) or (FEATURE_LAYOUT[key],)
        if (tensor.dtype, tensor.dim()) not in layouts:
            expected = " or ".join(f"{dtype} with {dims} dimensions" for dtype, dims in layouts)
            raise CorruptFileError(file, f"Tensor {key!r} is {tensor.dtype} of shape {tuple(tensor.shape)}, "
                                         f"expected {expected}; {RECREATE}.")
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    paired = "text_rows" not in tensors  # one caption per image, in the images' order
    groups = [[key for key in IMAGE_KEYS + EXAMPLE_KEYS + TEXT_KEYS if key in tensors]] if paired else \
        [[key for key in keys if key in tensors] for keys in (IMAGE_KEYS + EXAMPLE_KEYS, TEXT_KEYS)]
    for keys in groups:
        count = shapes[keys[0]][0]
        if count == 0 or any(shapes[key][0] != count for key in keys):
            raise CorruptFileError(file, f"Tensors hold different or zero example counts "
                                         f"{ {key: shapes[key] for key in keys} }, expected the same count >= 1 in "
                                         f"each; {RECREATE}.")
    if not paired:
        rows, images = tensors["text_rows"], shapes["image_tokens"][0]
        if int(rows.min()) < 0 or int(rows.max()) >= images:
            raise CorruptFileError(file, f"text_rows name image rows {int(rows.min())}..{int(rows.max())}, expected "
                                         f"0..{images - 1} (one per cached image); {RECREATE}.")
    for tokens, mask in (("image_tokens", "image_mask"), ("text_tokens", "text_mask")):
        if shapes[mask] != shapes[tokens][:2]:
            raise CorruptFileError(file, f"Tensor {mask!r} has shape {shapes[mask]}, expected {shapes[tokens][:2]} "
                                         f"to match {tokens!r}; {RECREATE}.")
    for key, tokens in (("vision_hidden_size", "image_tokens"), ("text_hidden_size", "text_tokens")):
        if key in metadata and metadata[key] != str(shapes[tokens][-1]):
            raise CorruptFileError(file, f"Metadata {key}={metadata[key]!r} but {tokens!r} is {shapes[tokens][-1]}-d; "
                                         f"{RECREATE}.")
    if "sha256" not in metadata:  # caches written before checksums were recorded
        return
    try:
        sums = json.loads(metadata["sha256"])
    except json.JSONDecodeError as error:
        raise CorruptFileError(file, f"Metadata sha256 is not valid JSON ({error}); {RECREATE}.") from error
    if not isinstance(sums, dict) or set(sums) != set(tensors):
        raise CorruptFileError(file, f"Metadata sha256 covers {sorted(sums) if isinstance(sums, dict) else sums!r}, "
                                     f"expected the tensors {sorted(tensors)}; {RECREATE}.")
    for key, tensor in tensors.items():
        digest = tensor_sha256(tensor)
        if digest != sums[key]:
            raise CorruptFileError(file, f"Tensor {key!r} has sha256 {digest[:16]}..., the metadata records "
                                         f"{str(sums[key])[:16]}...; the file was damaged or changed after saving, "
                                         f"{RECREATE}.")


def _connect_tuner(model: nn.Module):
    """The tuner of ``model`` (a PeftModel, or the tuner itself) if it computes from token features (``connect``)."""
    tuner = getattr(model, "base_model", model)
    if not callable(getattr(tuner, "connect", None)):
        raise TypeError("Expected a PeftModel whose adapter computes from cached token features (Alt-MoE, or S3 with "
                        f"heads), got {type(model).__name__}.")
    return tuner


class FeatureConnector(nn.Module):
    """The adapter of a PeftModel as a module over cached features, for training loops (Accelerate, DDP):
    ``FeatureConnector(peft_model)(**cached_batch)`` returns the tuner's ``connect`` output with its loss (Alt-MoE: the
    ``AltMoEOutput`` of its connector; S3: the forward's logits, loss and fields). ``labels`` and ``task_ids`` go to
    ``connect`` where it takes them. Other attributes (``save_pretrained``, ``peft_config``, ``base_model``...) are
    the PeftModel's."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        parameters = inspect.signature(_connect_tuner(peft_model).connect).parameters
        self._connect_takes = {name for name in EXAMPLE_KEYS if name in parameters}
        self.peft_model = peft_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["peft_model"], name)

    def forward(self, image_tokens: torch.Tensor, image_mask: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor, image_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                task_ids: torch.Tensor | None = None, return_loss: bool = True) -> AltMoEOutput:
        given = {"labels": labels, "task_ids": task_ids}
        unused = [name for name, value in given.items() if value is not None and name not in self._connect_takes]
        if unused:
            raise TypeError(f"The batch holds {unused}, which this adapter's connect does not take.")
        extra = {name: value for name, value in given.items() if value is not None}
        return _connect_tuner(self.peft_model).connect(image_tokens, image_mask, text_tokens, text_mask,
                                                       return_loss=return_loss, **extra)
