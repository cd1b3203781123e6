"""The training recipe's configuration: one dataclass, read from YAML with command-line overrides."""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..data.loading import load_task
from ..errors import ConfigError
from .methods import METHODS

MAPPING_FIELDS = ("method_config", "dataset_config")  # YAML mappings of keyword arguments
DATASET_ARGUMENTS = tuple(p.name for p in inspect.signature(load_task).parameters.values()
                          if p.kind is inspect.Parameter.KEYWORD_ONLY)  # set by TrainConfig fields

SYNTHETIC_BACKBONES = "synthetic"


@dataclass
class TrainConfig:
    """Everything a training run needs; every field can be set in YAML and overridden as ``--field value``."""

    method: str = field(default="mope", metadata={
        "help": "Adapter method: 'mope', 's3' or 'altmoe' (caption <-> image retrieval)."})
    method_config: str = field(default="{}", metadata={
        "help": "Keyword arguments of the method's config, as YAML/JSON, e.g. '{num_experts: 8}'."})
    dataset: str = field(default="synthetic:entailment", metadata={
        "help": "'synthetic:<task>', a known Hub dataset ('snli-ve', 'mm-imdb', 'food101'), an 'owner/name' Hub id, "
                "or 'local' with data_dir."})
    dataset_config: str = field(default="{}", metadata={
        "help": "Keyword arguments of the dataset's loader, as YAML/JSON, e.g. '{hypotheses: [colour, shape]}' for "
                "synthetic:entailment or '{name: plain_text}' for a Hub dataset."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of local data (images + jsonl/csv)."})
    train_size: int = field(default=4000, metadata={"help": "Synthetic training examples."})
    eval_size: int = field(default=1000, metadata={"help": "Synthetic evaluation examples."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    strict_data: bool = field(default=False, metadata={"help": "Stop at the first bad row instead of dropping it."})
    image_size: int = field(default=32, metadata={"help": "Image size of the synthetic data."})
    vision_model: str = field(default=SYNTHETIC_BACKBONES, metadata={
        "help": "Vision backbone: Hub id or folder; 'synthetic' pretrains (once, cached) a tiny ViT offline."})
    text_model: str = field(default=SYNTHETIC_BACKBONES, metadata={
        "help": "Text backbone: Hub id or folder; 'synthetic' pretrains (once, cached) a tiny BERT offline."})
    backbone_cache: str | None = field(default=None, metadata={"help": "Cache folder of the synthetic backbones."})
    classifier_input: str | None = field(default=None, metadata={
        "help": "Features the head reads: 'vision', 'text' or 'concat'; default: the method's choice."})
    max_length: int = field(default=64, metadata={"help": "Maximum text length in tokens."})
    output_dir: str = field(default="outputs/mope-synthetic", metadata={"help": "Where adapters and logs go."})
    seed: int = field(default=0, metadata={"help": "Seed of everything random."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=32, metadata={"help": "Per-process training batch size."})
    eval_batch_size: int = field(default=128, metadata={"help": "Per-process evaluation batch size."})
    num_epochs: int = field(default=3, metadata={"help": "Training epochs (ignored when max_steps > 0)."})
    max_steps: int = field(default=0, metadata={"help": "Optimizer steps; 0 means num_epochs."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "A transformers scheduler name."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up steps."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'fp16' or 'bf16'."})
    logging_steps: int = field(default=25, metadata={"help": "Log the training loss every N steps."})
    eval_steps: int = field(default=200, metadata={"help": "Evaluate every N steps (and at the end)."})
    save_steps: int = field(default=200, metadata={"help": "Write a resumable checkpoint every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (oldest removed first)."})
    report_to: str = field(default="none", metadata={"help": "Accelerate trackers: 'none', 'all', 'tensorboard'..."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "A checkpoint folder, or 'latest' (the newest complete checkpoint under output_dir/checkpoints)."})
    strict_resume: bool = field(default=False, metadata={
        "help": "Refuse to resume when a checkpoint's random states are missing or damaged (by default a warning: "
                "the run continues but no longer repeats an uninterrupted one exactly)."})
    max_nonfinite_in_a_row: int = field(default=10, metadata={
        "help": "Steps with a non-finite loss or gradient are skipped and counted; stop after this many in a row."})
    unimodal_baselines: bool = field(default=True, metadata={"help": "Also score frozen single-modality probes."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final adapter and its card."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id for --push_to_hub."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})

    def __post_init__(self):
        positive = ("train_size", "eval_size", "batch_size", "eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "eval_steps", "save_steps", "max_length", "save_total_limit",
                    "max_nonfinite_in_a_row")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(name, f"{name} must be a finite number >= 0, got {value!r}.")
        if self.max_steps < 0 or self.num_epochs < 1 and self.max_steps == 0:
            raise ValueError(f"Set max_steps > 0 or num_epochs >= 1 (got max_steps={self.max_steps}, "
                             f"num_epochs={self.num_epochs}).")
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; available: {sorted(METHODS)}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id user/repo.")
        for name in MAPPING_FIELDS:
            if isinstance(getattr(self, name), dict):
                setattr(self, name, yaml.safe_dump(getattr(self, name)))
            if not isinstance(yaml.safe_load(getattr(self, name)) or {}, dict):
                raise ValueError(f"{name} must be a mapping of keyword arguments, got {getattr(self, name)!r}.")
        clash = sorted(set(self.dataset_kwargs) & set(DATASET_ARGUMENTS))
        if clash:
            raise ValueError(f"dataset_config sets {clash}, which TrainConfig fields set; use --train_size, "
                             "--eval_size, --seed, --image_size, --data_dir, --strict_data or --max_train_rows.")

    @property
    def method_kwargs(self) -> dict:
        """``method_config`` parsed into keyword arguments."""
        return yaml.safe_load(self.method_config) or {}

    @property
    def dataset_kwargs(self) -> dict:
        """``dataset_config`` parsed into keyword arguments of ``load_task``."""
        return yaml.safe_load(self.dataset_config) or {}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """``--config file.yaml`` sets defaults; any ``--field value`` on the command line overrides them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(TrainConfig)
    parser.add_argument("--config", type=str, default=None, help="YAML file with TrainConfig fields.")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if "--config" in argv:
        index = argv.index("--config")
        path = Path(argv[index + 1])
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file.")
        values = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}; valid fields: {sorted(known)}.")
        parser.set_defaults(**{k: (yaml.safe_dump(v) if k in MAPPING_FIELDS else v)
                               for k, v in values.items()})
    config, _ = parser.parse_args_into_dataclasses(args=argv)
    return config
