"""What a training run is built from: its output folder made ready, its towers (named, fetched or pretrained here),
its base model with the adapter, and its data loaders. ``Trainer.setup`` puts them together."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel

from ..atomic import recover_directory, write_file_atomic
from ..data.collate import FEATURE_COLUMNS, FeatureCollator, MultimodalCollator
from ..data.tasks import TaskData
from ..errors import ConfigError
from ..modeling import FeatureEncoderConfig, FeatureEncoderForClassification, VisionTextModelForClassification
from .config import AUTO_TOWERS, REAL_TOWERS, SYNTHETIC_BACKBONES, TrainConfig
from .features import CaptionPairs
from .methods import default_classifier_input

logger = logging.getLogger(__name__)
RUN_OUTPUTS = ("adapter", "best", "checkpoints", "metrics.json", "dropped_rows.json")


def prepare_output_dir(config: TrainConfig, accelerator) -> None:
    """Refuse a folder holding a finished run (unless overwriting or resuming); on the main process, finish or undo
    what a killed run left half written, remove the previous run's outputs with ``--overwrite_output_dir``, and say
    where everything will go."""
    out = Path(config.output_dir)
    finished = [name for name in ("metrics.json", "adapter") if (out / name).exists()]
    if finished and not (config.overwrite_output_dir or config.resume_from_checkpoint):
        raise ConfigError("output_dir", f"--output_dir {out} holds a finished run ({' and '.join(finished)}); "
                                        "pass --overwrite_output_dir to replace it, --resume_from_checkpoint "
                                        "latest to continue it, or choose another --output_dir.")
    if not accelerator.is_main_process:
        return
    for folder in (out, out / "checkpoints"):  # finish or undo writes a killed run left half done (logged)
        recover_directory(folder)
    if config.overwrite_output_dir and not config.resume_from_checkpoint:
        # one run per folder: a stale checkpoint of the old run must never be taken for 'latest' of this one
        removed = [name for name in RUN_OUTPUTS if (out / name).exists()]
        for name in removed:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        if removed:
            accelerator.print(f"--overwrite_output_dir: removed the previous run's {', '.join(removed)} from {out}.")
    where = out.resolve()
    accelerator.print(
        f"Output folder: {where}\n"
        f"  final adapter + model card   {where / 'adapter'}\n"
        f"  best adapter (by evaluation) {where / 'best'}\n"
        f"  checkpoints                  {where / 'checkpoints'} (every {config.save_steps} steps, newest "
        f"{config.save_total_limit} kept; --resume_from_checkpoint latest continues from them)\n"
        f"  metrics                      {where / 'metrics.json'}")


def write_dropped_rows(config: TrainConfig, task: TaskData) -> None:
    """List the bad rows dropped from the data in ``output_dir/dropped_rows.json`` (nothing when none were)."""
    report = task.report
    if not report.num_dropped:
        return
    out = Path(config.output_dir)
    dropped_file = out / "dropped_rows.json"
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(dropped_file, json.dumps({
        "dataset": config.dataset, "data_dir": config.data_dir, "dropped": report.num_dropped,
        "by_reason": {reason: n for reason, n in report.total.items() if n},
        "by_split": {split: {reason: n for reason, n in counts.items() if n}
                     for split, counts in report.counts.items() if sum(counts.values())},
        "malformed_lines": [{"split": bad.split, "file": bad.path, "line": bad.line, "problem": bad.problem}
                            for bad in report.bad_lines],
        "note": "Malformed lines are listed with their file and line; rows dropped for a missing or corrupt "
                "image, an empty text or an unknown label are counted by split and reason. --strict_data "
                "stops at the first bad row instead, naming it.",
    }, indent=2) + "\n")
    logger.warning("Dropped bad rows: %s (listed in %s)", report, dropped_file)


def resolve_towers(config: TrainConfig, accelerator) -> tuple[str, str]:
    """The two towers' folders or Hub ids: 'auto' is the synthetic backbones for synthetic data and the real
    pretrained towers otherwise; both kinds are built or fetched once and cached."""
    default = SYNTHETIC_BACKBONES if config.dataset.startswith("synthetic:") else REAL_TOWERS
    chosen = {m: default if name == AUTO_TOWERS else name
              for m, name in (("vision", config.vision_model), ("text", config.text_model))}
    resolved = dict(chosen)
    if SYNTHETIC_BACKBONES in chosen.values():
        from ..offline.backbones import pretrained_backbones

        with accelerator.main_process_first():
            cached = pretrained_backbones(cache_dir=config.backbone_cache, seed=config.seed,
                                          image_size=config.image_size, show_progress=accelerator.is_main_process)
        resolved.update({m: str(getattr(cached, m)) for m, name in chosen.items() if name == SYNTHETIC_BACKBONES})
    if REAL_TOWERS in chosen.values():
        from ..offline.real_towers import real_towers

        with accelerator.main_process_first():
            fetched = real_towers()
        resolved.update({m: fetched[m] for m, name in chosen.items() if name == REAL_TOWERS})
    described = {SYNTHETIC_BACKBONES: "tiny, pretrained here on the synthetic data",
                 REAL_TOWERS: "real pretrained tower, CLIP ViT-B/16 image tower / all-MiniLM-L6-v2"}
    layers = {"vision": config.vision_layers, "text": config.text_layers}
    for modality in ("vision", "text"):
        notes = [described[chosen[modality]]] if chosen[modality] in described else []
        notes += [f"first {layers[modality]} blocks"] if layers[modality] else []
        accelerator.print(f"{modality.capitalize()} tower: {resolved[modality]}"
                          + (f" ({'; '.join(notes)})" if notes else ""))
    return resolved["vision"], resolved["text"]


def feature_encoder(config: TrainConfig, task: TaskData, accelerator) -> FeatureEncoderForClassification:
    """The frozen feature towers of a feature task, random, sized from the data and drawn from the run's seed (the
    model card's snippet draws them again from that seed and their config)."""
    split = task.dataset["train"]
    (steps_a, size_a), (steps_b, size_b) = (split.features[column].shape for column in ("modality_a", "modality_b"))
    torch.manual_seed(config.seed)
    base = FeatureEncoderForClassification(FeatureEncoderConfig(
        feature_size_a=size_a, feature_size_b=size_b, hidden_size=config.feature_hidden_size,
        num_hidden_layers=config.feature_layers, id2label=dict(enumerate(task.label_names)),
        problem_type=task.task_type))
    accelerator.print(f"Feature towers: frozen, random (torch seed {config.seed}), sized from the data: "
                      f"modality_a {steps_a}x{size_a}, modality_b {steps_b}x{size_b}, each "
                      f"{config.feature_layers} block(s) of width {config.feature_hidden_size}")
    return base


def tower_kwargs(config: TrainConfig) -> dict:
    """``from_vision_text_pretrained`` keyword arguments that truncate the towers."""
    return {f"{modality}_num_hidden_layers": layers for modality, layers in
            (("vision", config.vision_layers), ("text", config.text_layers)) if layers is not None}


def image_processor(config: TrainConfig, vision_path: str):
    """The vision tower's image processor, resizing to ``--vision_image_size`` when set."""
    size = config.vision_image_size
    processor = AutoImageProcessor.from_pretrained(vision_path)
    if size is None:
        return processor

    def resized(sizes) -> dict:  # {"height", "width"} or {"shortest_edge"}, as the processor has them
        return {key: size for key, value in dict(sizes).items() if value is not None}

    updates = {"size": resized(processor.size)}
    if getattr(processor, "crop_size", None):
        updates["crop_size"] = resized(processor.crop_size)
    return AutoImageProcessor.from_pretrained(vision_path, **updates)


@contextmanager
def _without_new_projection_notice():
    """transformers warns that a dual encoder's projections are "newly initialized ... TRAIN this model": expected
    for a connector that trains its own projections, so exactly that message is dropped, around the build."""
    dual_encoder_logger = logging.getLogger(VisionTextDualEncoderModel.__module__)

    def not_the_new_head_notice(record: logging.LogRecord) -> bool:
        return "newly initialized. You should probably TRAIN this model" not in record.getMessage()

    dual_encoder_logger.addFilter(not_the_new_head_notice)
    try:
        yield
    finally:
        dual_encoder_logger.removeFilter(not_the_new_head_notice)


def build_base(config: TrainConfig, task: TaskData, peft_config, towers: tuple[str, str] | None, accelerator):
    """The frozen base model of the run: feature towers for a feature task (``towers`` None), a dual encoder of the
    two towers for retrieval (no head: the adapter aligns their embeddings), else a classifier over them."""
    if towers is None:
        return feature_encoder(config, task, accelerator)
    if task.task_type == "retrieval":
        with _without_new_projection_notice():
            return VisionTextDualEncoderModel.from_vision_text_pretrained(*towers, **tower_kwargs(config))
    return VisionTextModelForClassification.from_vision_text_pretrained(
        *towers, num_labels=len(task.label_names), problem_type=task.task_type,
        classifier_input=config.classifier_input or default_classifier_input(peft_config),
        id2label=dict(enumerate(task.label_names)), **tower_kwargs(config))


def with_adapter(base, peft_config) -> peft.PeftModel:
    """PEFT's ``get_peft_model`` over the base."""
    with warnings.catch_warnings():
        # PEFT's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with
        # a FutureWarning on every model; the recipe never checkpoints activations. Only that message is hidden.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return peft.get_peft_model(base, peft_config)


@dataclass
class RunData:
    """A run's collator and loaders: training (shuffled from the run's seed), evaluation, and the two the unimodal
    probes read (training rows in order, evaluation); ``eval_split`` is the evaluation rows themselves."""

    collator: object
    train_loader: DataLoader
    eval_loader: DataLoader
    probe_loaders: tuple[DataLoader, DataLoader]
    eval_split: object


def build_loaders(config: TrainConfig, task: TaskData, base, towers: tuple[str, str] | None) -> RunData:
    """Batches of the task for the base: feature tensors for a feature task, processed images and tokenized texts
    otherwise (one example per (image, caption) pair for retrieval: every caption of every image)."""
    train_split = task.dataset["train"]
    eval_split = task.dataset[task.eval_split]
    if towers is None:  # rows read as tensors, batched into features_a, features_b, labels
        collator = FeatureCollator()
        columns = [column for column in FEATURE_COLUMNS if column in train_split.column_names]
        train_split = train_split.with_format("torch", columns=columns)
        eval_split = eval_split.with_format("torch", columns=columns)
    else:
        vision_path, text_path = towers
        native = getattr(base.vision_model.config, "image_size", None)
        resized = config.vision_image_size is not None and config.vision_image_size != native
        collator = MultimodalCollator(
            AutoTokenizer.from_pretrained(text_path), image_processor(config, vision_path),
            task_type=task.task_type, max_length=config.max_length, num_labels=len(task.label_names) or None,
            model_kwargs={"interpolate_pos_encoding": True} if resized else None)
    if task.task_type == "retrieval":
        train_split = CaptionPairs(train_split)
    train_loader = DataLoader(train_split, batch_size=config.batch_size, shuffle=True, drop_last=True,
                              collate_fn=collator, num_workers=config.num_workers,
                              generator=torch.Generator().manual_seed(config.seed))
    eval_loader = DataLoader(eval_split, batch_size=config.eval_batch_size, collate_fn=collator,
                             num_workers=config.num_workers)
    probe_loaders = (DataLoader(train_split, batch_size=config.eval_batch_size, collate_fn=collator), eval_loader)
    return RunData(collator, train_loader, eval_loader, probe_loaders, eval_split)
