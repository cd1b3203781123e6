"""Cached tower features for adapters that sit on frozen towers' outputs: each image and each caption goes through its
frozen tower once, the token features are stored (safetensors, written atomically, every tensor's sha256 in the
metadata) under a key of the towers' weights and configs, the collator's settings and the data, and training then
reads the cache instead of running the towers.

A method supports the cache when its tuner has ``tower_tokens(modality, **inputs)`` (one tower's token features and
mask) and ``connect(image_tokens, image_mask, text_tokens, text_mask, return_loss)`` (the adapter on them; with
``labels`` and ``task_ids`` for labelled tasks), and names what it extracts with ``feature_signature()`` (part of the
key: one method's cache is never read for another). Retrieval (Alt-MoE) caches each image once and every caption;
labelled tasks (S3) one row per example with its labels. The towers run in evaluation mode (no dropout) while the
cache is built.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..altmoe.features import (
    EXAMPLE_KEYS,
    IMAGE_KEYS,
    CachedFeatures,
    FeatureConnector,
    cache_features,
    padded_text,
    towers_in_eval,
    write_features,
)
from ..atomic import exclusive_lock
from ..checksums import tensor_sha256
from ..errors import CorruptFileError

FORMAT_VERSION = 1


def default_feature_cache_dir() -> Path:
    """``$MMEXPERTS_CACHE/features``, else ``~/.cache/mmexperts/features``."""
    root = os.environ.get("MMEXPERTS_CACHE")
    return Path(root) / "features" if root else Path.home() / ".cache" / "mmexperts" / "features"


class CaptionPairs(Dataset):
    """A retrieval split as one example per (image, caption) pair: every caption of every row, in row order; each
    example is its row with ``captions`` holding that one caption."""

    def __init__(self, split):
        self.split = split
        self.pairs = [(row, index) for row, captions in enumerate(split["captions"])
                      for index in range(len(captions))] if "captions" in split.column_names else \
            [(row, 0) for row in range(len(split))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        row, caption = self.pairs[index]
        item = dict(self.split[row])
        if "captions" in item:
            item["captions"] = [item["captions"][caption]]
        return item

    @property
    def rows(self) -> torch.Tensor:
        """The split row of each pair."""
        return torch.tensor([row for row, _ in self.pairs], dtype=torch.long)


def feature_tuner(model: torch.nn.Module):
    """The tuner of ``model`` (a PeftModel) if its method can train from cached tower features, else None."""
    tuner = getattr(model, "base_model", model)
    return tuner if callable(getattr(tuner, "tower_tokens", None)) and callable(getattr(tuner, "connect", None)) \
        else None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def towers_fingerprint(tuner) -> dict:
    """sha256 of each frozen tower's configuration and weights (adapter weights excluded)."""
    result = {}
    for modality, tower in tuner.towers.items():
        config = getattr(tower.module, "config", None)
        weights = {name.replace(".base_layer.", "."): tensor_sha256(value.detach().cpu())
                   for name, value in tower.module.state_dict().items() if tuner.prefix not in name}
        result[modality] = {"config": _digest(config.to_dict() if config is not None else None),
                            "attention": getattr(config, "_attn_implementation", None),  # decides the padding mask
                            "weights": _digest(weights)}
    return result


def collator_fingerprint(collator) -> dict:
    """What turns rows into tower inputs: tokenizer, image processor, maximum length, extra tower options."""
    tokenizer = collator.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the padding and truncation state changes with each call: not part of the key
        vocabulary = json.dumps({k: v for k, v in json.loads(backend.to_str()).items()
                                 if k not in ("padding", "truncation")}, sort_keys=True)
    else:
        vocabulary = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {"tokenizer": hashlib.sha256(vocabulary.encode()).hexdigest(), "tokenizer_class": type(tokenizer).__name__,
            "image_processor": _digest(collator.image_processor.to_dict()), "max_length": collator.max_length,
            "model_kwargs": _digest({k: repr(v) for k, v in collator.model_kwargs.items()})}


def data_fingerprint(split) -> str:
    """sha256 of a ``datasets.Dataset``'s Arrow table (and its row order)."""
    digest = hashlib.sha256()
    tables = [split.data.table] + ([split._indices.table] if getattr(split, "_indices", None) is not None else [])
    for table in tables:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return digest.hexdigest()


def feature_signature(tuner) -> dict:
    """What the method's ``tower_tokens`` extracts (its ``feature_signature()``; else the tuner's class name)."""
    signature = getattr(tuner, "feature_signature", None)
    return signature() if callable(signature) else {"method": type(tuner).__name__}


def cache_key(tuner, collator, split, every_caption: bool, labelled: bool = False) -> dict:
    """Everything the cached features depend on: the method's feature extraction, the towers, the collator, the data
    and the layout (every caption, or one row per example; ``labelled``: with its labels)."""
    key = {"format": FORMAT_VERSION, "features": feature_signature(tuner), "towers": towers_fingerprint(tuner),
           "collator": collator_fingerprint(collator), "data": data_fingerprint(split), "every_caption": every_caption}
    return {**key, "labelled": True} if labelled else key


@torch.no_grad()
def build_caption_cache(model: torch.nn.Module, split, collator, path: str | os.PathLike, batch_size: int = 64,
                        metadata: dict[str, str] | None = None, progress: bool = False) -> Path:
    """Cache each image of ``split`` once and every caption of it (``text_rows`` names each caption's image)."""
    tuner = feature_tuner(model)
    pairs = CaptionPairs(split)
    parts = {"vision": [], "text": []}
    with towers_in_eval(tuner):
        for modality, rows in (("vision", split), ("text", pairs)):
            loader = DataLoader(rows, batch_size=batch_size, collate_fn=collator)
            for batch in tqdm(loader, desc=f"caching {modality} features", disable=not progress):
                inputs = {k: v for k, v in batch.items() if k != "image_ids"}
                tokens, mask = tuner.tower_tokens(modality, **inputs)
                parts[modality].append((tokens.float().cpu(), mask.long().cpu(), batch.get("image_ids")))
    tensors = {"image_tokens": torch.cat([t for t, _, _ in parts["vision"]]),
               "image_mask": torch.cat([m for _, m, _ in parts["vision"]]),
               **padded_text([t for t, _, _ in parts["text"]], [m for _, m, _ in parts["text"]]),
               "text_rows": pairs.rows}
    if all(ids is not None for _, _, ids in parts["vision"]):
        tensors["image_ids"] = torch.cat([ids for _, _, ids in parts["vision"]]).long()
    return write_features(tensors, path, metadata)


@torch.no_grad()
def build_example_cache(model: torch.nn.Module, split, collator, path: str | os.PathLike, batch_size: int = 64,
                        metadata: dict[str, str] | None = None, progress: bool = False) -> Path:
    """Cache one row per example of a labelled split: both towers' token features (``tower_tokens``), their masks, and
    the batch's ``labels`` (and ``task_ids``) as the collator gives them."""
    tuner = feature_tuner(model)
    parts = {key: [] for key in ("image_tokens", "image_mask", "text_tokens", "text_mask", *EXAMPLE_KEYS)}
    with towers_in_eval(tuner):
        # a loader of its own generator: building the cache draws nothing from the global RNG, so a run that builds
        # it draws the same random numbers (augmented views, dropout) as one that reads it or runs the towers
        loader = DataLoader(split, batch_size=batch_size, collate_fn=collator, generator=torch.Generator())
        for batch in tqdm(loader, desc="caching tower features", disable=not progress):
            inputs = {k: v for k, v in batch.items() if k not in ("image_ids", *EXAMPLE_KEYS)}
            for modality, prefix in (("vision", "image"), ("text", "text")):
                tokens, mask = tuner.tower_tokens(modality, **inputs)
                parts[f"{prefix}_tokens"].append(tokens.float().cpu())
                parts[f"{prefix}_mask"].append(mask.long().cpu())
            for key in EXAMPLE_KEYS:
                if batch.get(key) is not None:
                    parts[key].append(torch.as_tensor(batch[key]).cpu())
    if not parts["image_tokens"]:
        raise ValueError("No examples to cache: the split is empty.")
    tensors = {"image_tokens": torch.cat(parts["image_tokens"]), "image_mask": torch.cat(parts["image_mask"]),
               **padded_text(parts["text_tokens"], parts["text_mask"])}
    for key in EXAMPLE_KEYS:
        if parts[key]:
            values = torch.cat(parts[key])
            tensors[key] = values.float() if values.is_floating_point() else values.long()
    return write_features(tensors, path, metadata)


def cached_split(model: torch.nn.Module, split, collator, name: str, every_caption: bool,
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 64, progress: bool = False,
                 log=print, labelled: bool = False) -> CachedFeatures:
    """The cached features of one split: read when a cache with the same key exists, else built (once, under a
    lock) and written. ``every_caption``: each image once and all its captions; else caption 0 beside each image
    (``labelled``: one row per example, with its labels)."""
    tuner = feature_tuner(model)
    key = cache_key(tuner, collator, split, every_caption, labelled)
    fingerprint = _digest(key)
    root = Path(cache_dir) if cache_dir is not None else default_feature_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{name}-{fingerprint[:24]}"
    with exclusive_lock(root / f".{folder.name}.lock", on_wait=lambda: log(f"Waiting for {folder}: another process "
                                                                           "is building it.")):
        if not folder.exists():
            log(f"Caching tower features of the {name} split in {folder} (once; later runs read them).")
            metadata = {"fingerprint": fingerprint, "key": json.dumps(key, sort_keys=True)}
            if every_caption:
                build_caption_cache(model, split, collator, folder, batch_size, metadata, progress)
            elif labelled:
                build_example_cache(model, split, collator, folder, batch_size, metadata, progress)
            else:
                loader = DataLoader(split, batch_size=batch_size, collate_fn=collator)
                cache_features(model, loader, folder, progress=progress, metadata=metadata)
        else:
            log(f"Reading cached tower features of the {name} split from {folder}.")
    try:
        features = CachedFeatures(folder)
    except CorruptFileError as error:
        raise CorruptFileError(folder, f"The cached tower features are damaged ({error}); remove the folder (rm -r "
                                       f"{folder}) and run again to rebuild them.") from error
    if features.metadata.get("fingerprint") != fingerprint:
        raise CorruptFileError(folder, f"Its fingerprint is {features.metadata.get('fingerprint')!r}, expected "
                                       f"{fingerprint!r} (the towers, collator and data of this run); remove the "
                                       f"folder (rm -r {folder}) and run again to rebuild it.")
    return features


class FeatureBatches(CachedFeatures):
    """Cached features (``CachedFeatures``, sharing its tensors) that a ``DataLoader`` reads a batch at a time: its
    ``__getitems__`` gathers the batch's rows of each stored tensor with one index each, instead of one dict of
    views per example stacked by ``CachedFeatures.collate``; ``collate`` then has nothing left to do. The batches
    are those of ``CachedFeatures.collate``: the same values, keys and layout (text trimmed after the batch's
    longest real caption); single examples (``dataset[i]``) are unchanged."""

    def __init__(self, features: CachedFeatures):  # the tensors are read and checked already: no super().__init__
        self.tensors, self.metadata = features.tensors, features.metadata
        self.text_lengths = self.tensors["text_mask"].sum(1)  # real tokens of each caption

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        rows = self.tensors.get("text_rows")
        images = index if rows is None else rows.index_select(0, index)
        batch = {key: self.tensors[key].index_select(0, images) for key in IMAGE_KEYS + EXAMPLE_KEYS
                 if key in self.tensors}
        length = max(int(self.text_lengths.index_select(0, index).max()), 1)
        for key in ("text_tokens", "text_mask"):
            batch[key] = self.tensors[key].index_select(0, index)[:, :length]
        return batch

    @staticmethod
    def collate(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch ``__getitems__`` gathered, as it is."""
        return batch


def cached_feature_loaders(trainer, train_split, eval_split) -> tuple[torch.nn.Module, DataLoader, DataLoader]:
    """For the engine: the module to train on cached features (``FeatureConnector`` over the PeftModel) and the
    training (shuffled as the tower loader is) and evaluation loaders. Retrieval: every caption of each training
    image, caption 0 of each evaluation image; labelled tasks: one row per example with its labels."""
    config, accelerator = trainer.config, trainer.accelerator
    retrieval = trainer.retrieval
    check = getattr(feature_tuner(trainer.model), "check_connect", None)
    if callable(check):  # refuse before the towers run over the data
        check()
    with accelerator.main_process_first():
        caches = [cached_split(trainer.model, split, trainer.collator, name, every, config.feature_cache_dir,
                               config.eval_batch_size, progress=accelerator.is_main_process, log=accelerator.print,
                               labelled=not retrieval)
                  for split, name, every in ((train_split, "train", retrieval), (eval_split, "eval", False))]
    train, evaluation = (FeatureBatches(cache) for cache in caches)
    train_loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, drop_last=True,
                              collate_fn=FeatureBatches.collate, num_workers=config.num_workers,
                              generator=torch.Generator().manual_seed(config.seed))
    eval_loader = DataLoader(evaluation, batch_size=config.eval_batch_size, collate_fn=FeatureBatches.collate,
                             num_workers=config.num_workers)
    return FeatureConnector(trainer.model), train_loader, eval_loader
