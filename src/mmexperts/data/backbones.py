"""Tiny vision and text backbones pretrained offline on unimodal objectives over the synthetic scenes, cached.

Fusion methods are meant to sit on frozen *pretrained* encoders. With no Hub access, the offline benchmark pretrains
its own: a small ViT learns, from images alone, the colour and shape in each grid cell (multi-label), and a small BERT
learns the caption language by masked-language modelling. Both are written once, atomically, and reused.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, ViTConfig,
                          ViTForImageClassification, ViTImageProcessorPil)

from ..atomic import atomic_directory
from .synthetic import COLOURS, GRID_SIZE, SHAPES, build_tokenizer, make_scenes

RECIPE_VERSION = "v1"
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 64, 4, 4, 128
DEFAULT_VISION_STEPS, DEFAULT_TEXT_STEPS = 1500, 600
IMAGE_MEAN, IMAGE_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class PretrainedBackbones:
    """Folders loadable with ``AutoModel`` (+ ``AutoImageProcessor`` / ``AutoTokenizer``) and the pretraining report."""

    vision: Path
    text: Path
    report: dict


def default_cache_dir() -> Path:
    """``$MMEXPERTS_CACHE/backbones``, else ``~/.cache/mmexperts/backbones``."""
    root = os.environ.get("MMEXPERTS_CACHE")
    return Path(root) / "backbones" if root else Path.home() / ".cache" / "mmexperts" / "backbones"


def cell_targets(scene) -> np.ndarray:
    """Multi-hot targets: for each grid cell, the colour and the shape of the object there (if any)."""
    per_cell = len(COLOURS) + len(SHAPES)
    target = np.zeros(GRID_SIZE * GRID_SIZE * per_cell, dtype=np.float32)
    for obj in scene.objects:
        base = (obj.row * GRID_SIZE + obj.col) * per_cell
        target[base + COLOURS.index(obj.colour)] = 1.0
        target[base + len(COLOURS) + SHAPES.index(obj.shape)] = 1.0
    return target


def _image_processor(image_size: int) -> ViTImageProcessorPil:
    return ViTImageProcessorPil(do_resize=True, size={"height": image_size, "width": image_size},
                             image_mean=IMAGE_MEAN, image_std=IMAGE_STD)


def _pretrain_vision(folder: Path, steps: int, seed: int, image_size: int, progress: bool) -> dict:
    torch.manual_seed(seed)
    processor = _image_processor(image_size)
    scenes = make_scenes(3000, seed=seed, image_size=image_size, max_objects=4)
    pixels = processor([s["image"] for s in scenes], return_tensors="pt")["pixel_values"]
    targets = torch.from_numpy(np.stack([cell_targets(s["scene"]) for s in scenes]))
    train_x, train_y, test_x, test_y = pixels[:2600], targets[:2600], pixels[2600:], targets[2600:]
    config = ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       intermediate_size=INTERMEDIATE, image_size=image_size, patch_size=max(image_size // 8, 2),
                       num_labels=targets.shape[1], problem_type="multi_label_classification")
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="pretraining vision backbone", disable=not progress):
        rows = torch.randint(0, len(train_x), (64,), generator=generator)
        loss = model(pixel_values=train_x[rows], labels=train_y[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = model(pixel_values=test_x).logits > 0
    truth = test_y.bool()
    true_positive = (predicted & truth).sum().item()
    f1 = 2 * true_positive / max(predicted.sum().item() + truth.sum().item(), 1)
    model.vit.save_pretrained(folder)
    processor.save_pretrained(folder)
    return {"vision_cell_attribute_f1": round(f1, 4), "vision_steps": steps}


def _pretrain_text(folder: Path, steps: int, seed: int, progress: bool) -> dict:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(model_max_length=64)
    rng = np.random.default_rng(seed)
    captions = [c for s in make_scenes(2500, seed=seed + 1, image_size=16, max_objects=4) for c in s["captions"]]
    captions = [captions[i] for i in rng.permutation(len(captions))]
    split = int(0.9 * len(captions))
    encoded = tokenizer(captions, truncation=True, max_length=64)["input_ids"]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=64,
                        pad_token_id=tokenizer.pad_token_id)
    model = BertForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="pretraining text backbone", disable=not progress):
        rows = torch.randint(0, split, (64,), generator=generator).tolist()
        batch = collator([{"input_ids": encoded[i]} for i in rows])
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    torch.manual_seed(seed + 1)
    batch = collator([{"input_ids": ids} for ids in encoded[split:split + 2000]])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    masked = batch["labels"] != -100
    accuracy = (logits.argmax(-1)[masked] == batch["labels"][masked]).float().mean().item()
    model.bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"text_mlm_accuracy": round(accuracy, 4), "text_steps": steps}


def pretrained_backbones(cache_dir: str | os.PathLike | None = None, seed: int = 0, force: bool = False,
                         vision_steps: int | None = None, text_steps: int | None = None, image_size: int = 32,
                         show_progress: bool = True) -> PretrainedBackbones:
    """The cached tiny backbones for ``seed`` and ``image_size``, pretraining them first if they are not there."""
    vision_steps = DEFAULT_VISION_STEPS if vision_steps is None else vision_steps
    text_steps = DEFAULT_TEXT_STEPS if text_steps is None else text_steps
    for name, value in (("vision_steps", vision_steps), ("text_steps", text_steps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels for the synthetic scenes, got {image_size}.")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"{RECIPE_VERSION}-seed{seed}-{image_size}px-v{vision_steps}-t{text_steps}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{folder.name}.lock", "w") as lock:  # one builder at a time, across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force or not (folder / "report.json").is_file():
            start = time.perf_counter()
            with atomic_directory(folder) as staging:
                report = _pretrain_vision(staging / "vision", vision_steps, seed, image_size, show_progress)
                report.update(_pretrain_text(staging / "text", text_steps, seed, show_progress))
                report["seconds"] = round(time.perf_counter() - start, 1)
                (staging / "report.json").write_text(json.dumps(report, indent=2))
    return PretrainedBackbones(folder / "vision", folder / "text", json.loads((folder / "report.json").read_text()))
