"""Tiny vision and text backbones pretrained offline on unimodal objectives over the synthetic scenes, cached.

Fusion methods are meant to sit on frozen *pretrained* encoders. With no Hub access, the offline benchmark pretrains
its own: a small ViT learns, from images alone, the colour and shape of the object in each grid cell (multi-label),
and a small BERT learns the caption language by masked-language modelling while its [CLS] feature learns to
reconstruct the whole caption (a sentence-level objective, the role next-sentence prediction plays for BERT's
[CLS]). Both are written once, atomically, and
reused by every later call (and every process) with the same recipe, seed, image size and step counts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    ViTModel,
)
from transformers.utils import logging as hf_logging

from ..atomic import atomic_directory, exclusive_lock
from ..training.engine import Engine, StepOutput, adamw_with_lr_scheduler
from .synthetic import (
    COLOURS,
    GRID_SIZE,
    MULTILABEL_TEMPLATES,
    SHAPES,
    build_tokenizer,
    caption_text,
    render_scene,
    sample_scene,
    true_captions,
)

__all__ = ["PretrainedBackbones", "cell_targets", "default_cache_dir", "pretrained_backbones"]

RECIPE_VERSION = "v3"
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 64, 4, 4, 128
MAX_TEXT_LENGTH = 64
DEFAULT_VISION_STEPS, DEFAULT_TEXT_STEPS = 2000, 1000
MIN_IMAGE_SIZE = 16
IMAGE_MEAN, IMAGE_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
REPORT_FILE = "report.json"

# Data and optimisation of the recipe (changing any of them means bumping RECIPE_VERSION).
VISION_BATCH, VISION_LR, VISION_POOL_PIXELS, VISION_EVAL, VISION_MAX_OBJECTS = 64, 3e-3, 32768 * 32 * 32, 1000, 5
TEXT_BATCH, TEXT_LR, TEXT_POOL, TEXT_EVAL, TEXT_MAX_OBJECTS = 64, 2e-3, 32768, 2000, 5
CAPTIONS_PER_SCENE, QUERY_FRACTION, MASK_PROBABILITY = 4, 0.1, 0.15
SENTENCE_POSITIONS = 24  # caption tokens the [CLS] feature is trained to reconstruct
BAG_OF_WORDS_WEIGHT = 10.0  # weight of the [CLS] bag-of-words loss (per-word BCE, averaged over the vocabulary)
_VISION_STREAM, _TEXT_STREAM = 101, 102  # keep these data streams apart from the task builders' streams


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
    """Multi-hot targets of the vision objective: for each grid cell, the colour and the shape of its object."""
    per_cell = len(COLOURS) + len(SHAPES)
    target = np.zeros(GRID_SIZE * GRID_SIZE * per_cell, dtype=np.float32)
    for obj in scene.objects:
        base = (obj.row * GRID_SIZE + obj.col) * per_cell
        target[base + COLOURS.index(obj.colour)] = 1.0
        target[base + len(COLOURS) + SHAPES.index(obj.shape)] = 1.0
    return target


def _rng(seed: int, stream: int, split: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, split]))


def _patch_size(image_size: int) -> int:
    """A 4x4 grid of patches: cheap, and it trained better than 8x8 on the 3x3 scenes."""
    return image_size // 4


def _image_processor(image_size: int) -> ViTImageProcessorPil:
    return ViTImageProcessorPil(do_resize=True, size={"height": image_size, "width": image_size},
                                do_rescale=True, do_normalize=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)


def _identity_pooler(model: nn.Module) -> None:
    """Give the (unpretrained) pooler fixed identity weights, so ``pooler_output`` is tanh of the [CLS] feature."""
    with torch.no_grad():
        model.pooler.dense.weight.copy_(torch.eye(model.pooler.dense.weight.shape[0]))
        model.pooler.dense.bias.zero_()


def _encoder_from(trained: nn.Module, encoder: nn.Module) -> nn.Module:
    """``encoder`` (with a pooler) holding the weights of the pretrained ``trained`` encoder (without one)."""
    missing, unexpected = encoder.load_state_dict(trained.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise RuntimeError(f"encoder weights do not match: missing {missing}, unexpected {unexpected}")
    _identity_pooler(encoder)
    return encoder


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _loop(model: nn.Module, steps: int, lr: float, batches, description: str, progress: bool, bar=None) -> float:
    """The training engine with AdamW, linear warm-up then cosine decay, over ``steps`` batches of model inputs (no
    clipping); returns the last loss.

    ``bar``: a shared tqdm bar (the whole build's) to advance; without one, this loop shows its own when
    ``progress``."""
    optimizer, lr_scheduler = adamw_with_lr_scheduler(model.parameters(), lr, steps, weight_decay=0.01)
    # in this process alone (the main process builds while the others wait), without Accelerate's shared state
    engine = Engine(model, optimizer, lr_scheduler, skip_nonfinite=False)
    model.train()
    own = bar is None
    if own:
        bar = tqdm(total=steps, desc=description, disable=not progress)
    else:
        bar.set_description(f"building backbones: {description.removeprefix('pretraining ')}")

    def show_loss(out: StepOutput) -> None:
        if (out.step - 1) % 50 == 0 or out.step == steps:
            bar.set_postfix(loss=f"{out.loss:.4f}")

    last = engine.run(batches, steps, progress=bar, callbacks=[show_loss])
    if own:
        bar.close()
    model.eval()
    return last.loss


def _epochs(size: int, batch_size: int, generator: torch.Generator):
    """Row indices of successive batches, reshuffling the pool at the start of every pass."""
    while True:
        order = torch.randperm(size, generator=generator)
        for start in range(0, size - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


# ------------------------------------------------------------------------------------------------------ vision


def _scene_images(count: int, rng: np.random.Generator, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` rendered random scenes as uint8 ``(N, 3, H, W)`` pixels and their cell targets."""
    pixels = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    targets = np.empty((count, GRID_SIZE * GRID_SIZE * (len(COLOURS) + len(SHAPES))), dtype=np.float32)
    for i in range(count):
        scene = sample_scene(rng, VISION_MAX_OBJECTS)
        pixels[i] = np.asarray(render_scene(scene, image_size, rng))
        targets[i] = cell_targets(scene)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(targets)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """What the saved image processor does to an image already at the model's size (rescale, then normalise)."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def _vision_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    predicted, truth = logits > 0, targets.bool()
    true_positive = (predicted & truth).sum().item()
    cells_right = (predicted == truth).view(len(truth), GRID_SIZE * GRID_SIZE, -1).all(-1)
    positive_rate = truth.float().mean().item()
    return {
        "vision_attribute_f1": 2 * true_positive / max(predicted.sum().item() + truth.sum().item(), 1),
        "vision_attribute_accuracy": (predicted == truth).float().mean().item(),
        "vision_cell_accuracy": cells_right.float().mean().item(),
        "vision_scene_exact_match": cells_right.all(-1).float().mean().item(),
        # references: the F1 of calling every attribute present, the accuracy of calling every one absent
        "vision_attribute_f1_chance": 2 * positive_rate / (1 + positive_rate),
        "vision_attribute_accuracy_all_absent": 1 - positive_rate,
    }


def _pretrain_vision(folder: Path, steps: int, seed: int, image_size: int, progress: bool, bar=None) -> dict:
    """Train a tiny ViT to name the colour and shape in every grid cell; save its encoder and image processor."""
    if bar is not None:
        bar.set_description("building backbones: rendering scenes")
    pool = min(steps * VISION_BATCH, max(VISION_POOL_PIXELS // image_size ** 2, VISION_BATCH))
    train_x, train_y = _scene_images(pool, _rng(seed, _VISION_STREAM, 0), image_size)
    test_x, test_y = _scene_images(VISION_EVAL, _rng(seed, _VISION_STREAM, 1), image_size)
    architecture = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=INTERMEDIATE, image_size=image_size, patch_size=_patch_size(image_size))
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**architecture, num_labels=train_y.shape[1],
                                                problem_type="multi_label_classification"))
    rows = _epochs(len(train_x), VISION_BATCH, torch.Generator().manual_seed(seed))
    batches = ({"pixel_values": _normalise(train_x[r]), "labels": train_y[r]} for r in rows)
    loss = _loop(model, steps, VISION_LR, batches, "pretraining vision backbone", progress, bar)
    with torch.no_grad():
        logits = torch.cat([model(pixel_values=_normalise(test_x[i:i + 250])).logits
                            for i in range(0, len(test_x), 250)])
    encoder = _encoder_from(model.vit, ViTModel(ViTConfig(**architecture), add_pooling_layer=True))
    encoder.save_pretrained(folder)
    _image_processor(image_size).save_pretrained(folder)
    return {**_vision_metrics(logits, test_y), "vision_final_train_loss": loss, "vision_parameters": _count(encoder),
            "vision_train_images": len(train_x), "vision_eval_images": len(test_x)}


# -------------------------------------------------------------------------------------------------------- text


def _caption_corpus(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` texts of the synthetic tasks: true captions of random scenes and, now and then, colour queries."""
    texts: list[str] = []
    while len(texts) < count:
        if rng.random() < QUERY_FRACTION:
            template = MULTILABEL_TEMPLATES[rng.integers(len(MULTILABEL_TEMPLATES))]
            texts.append(template.format(colour=COLOURS[rng.integers(len(COLOURS))]))
            continue
        captions = true_captions(sample_scene(rng, TEXT_MAX_OBJECTS))
        chosen = rng.choice(len(captions), min(CAPTIONS_PER_SCENE, len(captions)), replace=False)
        texts.extend(caption_text(captions[j]) for j in chosen)
    return texts[:count]


def _mask(input_ids: torch.Tensor, special: torch.Tensor, tokenizer, generator: torch.Generator,
          mask_share: float, random_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: 15% of the words become targets; of those, a share becomes [MASK] and a share a random word."""
    labels = input_ids.clone()
    chosen = (torch.rand(input_ids.shape, generator=generator) < MASK_PROBABILITY) & ~special
    labels[~chosen] = -100
    inputs = input_ids.clone()
    draw = torch.rand(input_ids.shape, generator=generator)
    inputs[chosen & (draw < mask_share)] = tokenizer.mask_token_id
    randomised = chosen & (draw >= mask_share) & (draw < mask_share + random_share)
    first_word = max(tokenizer.all_special_ids) + 1  # the special tokens come first in the vocabulary
    words = torch.randint(first_word, len(tokenizer), input_ids.shape, generator=generator)
    inputs[randomised] = words[randomised]
    return inputs, labels


class _SentenceMLM(nn.Module):
    """BERT MLM plus [CLS] decoders that read the caption back from the [CLS] feature alone: every token at its
    position, and the set of its words (without the set, [CLS] learns the templates and not the content words)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.mlm = BertForMaskedLM(config)
        self.positions = nn.Parameter(torch.randn(SENTENCE_POSITIONS, config.hidden_size) * 0.02)
        self.project = nn.Linear(config.hidden_size, config.hidden_size)
        self.decode = nn.Linear(config.hidden_size, config.vocab_size)
        self.words = nn.Linear(config.hidden_size, config.vocab_size)

    def sentence_logits(self, cls: torch.Tensor) -> torch.Tensor:
        return self.decode(nn.functional.gelu(self.project(cls)[:, None] + self.positions))

    def forward(self, input_ids, attention_mask, labels, sentence):
        out = self.mlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
        cls = out.hidden_states[-1][:, 0]
        logits = self.sentence_logits(cls)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), sentence.flatten(), ignore_index=-100)
        bag = torch.zeros(len(sentence), self.words.out_features + 1, device=cls.device)
        bag.scatter_(1, sentence.masked_fill(sentence < 0, bag.shape[1] - 1), 1.0)  # -100 goes to a spare column
        bag_loss = nn.functional.binary_cross_entropy_with_logits(self.words(cls), bag[:, :-1])
        out.loss = out.loss + loss + BAG_OF_WORDS_WEIGHT * bag_loss
        return out


def _sentence_targets(input_ids: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """The caption's word ids at positions 0..SENTENCE_POSITIONS-1 (special tokens and padding dropped), else -100."""
    keep = ~special
    position = keep.long().cumsum(1) - 1  # each word's index among the caption's words
    rows, cols = (keep & (position < SENTENCE_POSITIONS)).nonzero(as_tuple=True)
    targets = torch.full((len(input_ids), SENTENCE_POSITIONS), -100, dtype=torch.long)
    targets[rows, position[rows, cols]] = input_ids[rows, cols]
    return targets


def _pretrain_text(folder: Path, steps: int, seed: int, progress: bool, bar=None) -> dict:
    """Train a tiny BERT by MLM and [CLS] caption reconstruction; save its encoder and the tokenizer."""
    if bar is not None:
        bar.set_description("building backbones: writing captions")
    tokenizer = build_tokenizer(model_max_length=MAX_TEXT_LENGTH)

    def encode(texts: list[str]) -> dict:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt",
                          return_special_tokens_mask=True)
        batch["special_tokens_mask"] = batch["special_tokens_mask"].bool()  # also marks the padding
        return batch

    train = encode(_caption_corpus(min(steps * TEXT_BATCH, TEXT_POOL), _rng(seed, _TEXT_STREAM, 0)))
    test = encode(_caption_corpus(TEXT_EVAL, _rng(seed, _TEXT_STREAM, 1)))
    architecture = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                        max_position_embeddings=MAX_TEXT_LENGTH, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = _SentenceMLM(BertConfig(**architecture))
    generator = torch.Generator().manual_seed(seed)
    train["sentence"] = _sentence_targets(train["input_ids"], train["special_tokens_mask"])

    def batch(rows: torch.Tensor) -> dict:
        length = int(train["attention_mask"][rows].sum(1).max())  # drop the padding no text of the batch needs
        inputs, labels = _mask(train["input_ids"][rows, :length], train["special_tokens_mask"][rows, :length],
                               tokenizer, generator, 0.8, 0.1)
        return {"input_ids": inputs, "attention_mask": train["attention_mask"][rows, :length], "labels": labels,
                "sentence": train["sentence"][rows]}

    rows = _epochs(len(train["input_ids"]), TEXT_BATCH, generator)
    loss = _loop(model, steps, TEXT_LR, (batch(r) for r in rows), "pretraining text backbone", progress, bar)
    # held-out texts with every target replaced by [MASK]; the unigram baseline always guesses the commonest word
    inputs, labels = _mask(test["input_ids"], test["special_tokens_mask"], tokenizer,
                           torch.Generator().manual_seed(seed + 1), 1.0, 0.0)
    with torch.no_grad():
        logits = model.mlm(input_ids=inputs, attention_mask=test["attention_mask"]).logits
        cls = model.mlm.bert(input_ids=test["input_ids"], attention_mask=test["attention_mask"]).last_hidden_state[:, 0]
        sentence = _sentence_targets(test["input_ids"], test["special_tokens_mask"])
        known = sentence != -100
        read_back = (model.sentence_logits(cls).argmax(-1) == sentence) | ~known
    targets = labels != -100
    words = train["input_ids"][~train["special_tokens_mask"]]
    commonest = torch.bincount(words, minlength=len(tokenizer)).argmax()
    encoder = _encoder_from(model.mlm.bert, BertModel(BertConfig(**architecture), add_pooling_layer=True))
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"text_mlm_accuracy": (logits.argmax(-1)[targets] == labels[targets]).float().mean().item(),
            "text_mlm_unigram_accuracy": (labels[targets] == commonest).float().mean().item(),
            "text_cls_token_accuracy": ((read_back & known).sum() / known.sum()).item(),
            "text_cls_sentence_exact_match": read_back.all(-1).float().mean().item(),
            "text_final_train_loss": loss, "text_parameters": _count(encoder),
            "text_train_texts": len(train["input_ids"]), "text_eval_texts": len(test["input_ids"])}


# ------------------------------------------------------------------------------------------------------- cache


def _check_int(name: str, value, minimum: int, unit: str = "") -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{unit}, got {value!r}")


def _is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished build (it only ever appears whole, by an atomic rename)."""
    return all((folder / name).is_file() for name in
               (REPORT_FILE, "vision/config.json", "vision/model.safetensors", "vision/preprocessor_config.json",
                "text/config.json", "text/model.safetensors", "text/tokenizer.json"))


def _load(folder: Path) -> PretrainedBackbones:
    return PretrainedBackbones(folder / "vision", folder / "text", json.loads((folder / REPORT_FILE).read_text()))


@contextmanager
def _quiet_saving(quiet: bool):
    """Hide transformers' own progress bars (shard writing) when ``quiet`` (always during a build: its one bar)."""
    if not quiet or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def build_estimate(vision_steps: int, text_steps: int, image_size: int) -> float:
    """Rough seconds a build takes on free CPU cores: the default one (32 px) took about 90 s on 2 cores."""
    vision = 45.0 * vision_steps / DEFAULT_VISION_STEPS * (image_size / 32) ** 2
    text = 45.0 * text_steps / DEFAULT_TEXT_STEPS
    return (vision + text) * 2 / max(min(torch.get_num_threads(), 8), 1)


def _announce(folder: Path, vision_steps: int, text_steps: int, image_size: int) -> None:
    seconds = build_estimate(vision_steps, text_steps, image_size)
    rough = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
    tqdm.write(f"Building the synthetic backbones once (a tiny ViT, {vision_steps} steps, and a tiny BERT, "
               f"{text_steps} steps): roughly {rough} on {torch.get_num_threads()} CPU threads, longer on a busy "
               f"machine (the bar's estimate follows the real pace). Cached in {folder}; later runs load them from "
               "there in seconds.", file=sys.stderr)


def pretrained_backbones(cache_dir: str | os.PathLike | None = None, seed: int = 0, force: bool = False,
                         vision_steps: int | None = None, text_steps: int | None = None, image_size: int = 32,
                         show_progress: bool = True) -> PretrainedBackbones:
    """The cached tiny ViT and BERT backbones for this seed, image size and step counts, pretrained on first use.

    The vision folder loads with ``AutoModel`` (a ``ViTModel``) and ``AutoImageProcessor``, the text folder with
    ``AutoModel`` (a ``BertModel``) and ``AutoTokenizer`` (the synthetic captions' tokenizer); ``report`` holds the
    held-out pretraining metrics. ``force`` rebuilds even when a finished build is cached.
    """
    vision_steps = DEFAULT_VISION_STEPS if vision_steps is None else vision_steps
    text_steps = DEFAULT_TEXT_STEPS if text_steps is None else text_steps
    _check_int("vision_steps", vision_steps, 1)
    _check_int("text_steps", text_steps, 1)
    _check_int("seed", seed, 0)
    _check_int("image_size", image_size, MIN_IMAGE_SIZE, " pixels")
    seed, vision_steps, text_steps, image_size = int(seed), int(vision_steps), int(text_steps), int(image_size)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"{RECIPE_VERSION}-seed{seed}-{image_size}px-vision{vision_steps}-text{text_steps}"
    if not force and _is_complete(folder):
        return _load(folder)
    root.mkdir(parents=True, exist_ok=True)

    def waiting() -> None:
        if show_progress:
            tqdm.write(f"Waiting for another process that is building the synthetic backbones in {folder}...",
                       file=sys.stderr)

    with exclusive_lock(root / f".{folder.name}.lock", on_wait=waiting):
        if not force and _is_complete(folder):  # another process built it while this one waited for the lock
            return _load(folder)
        if show_progress:
            _announce(folder, vision_steps, text_steps, image_size)
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]), _quiet_saving(True), \
                atomic_directory(folder) as staging, \
                tqdm(total=vision_steps + text_steps, desc="building backbones", unit="step",
                     disable=not show_progress) as bar:
            report = {"recipe": RECIPE_VERSION, "seed": seed, "image_size": image_size,
                      "vision_steps": vision_steps, "text_steps": text_steps}
            report.update(_pretrain_vision(staging / "vision", vision_steps, seed, image_size, show_progress,
                                           bar=bar))
            report.update(_pretrain_text(staging / "text", text_steps, seed, show_progress, bar=bar))
            report["seconds"] = round(time.perf_counter() - start, 1)
            report = {key: round(value, 4) if isinstance(value, float) else value for key, value in report.items()}
            (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return _load(folder)
