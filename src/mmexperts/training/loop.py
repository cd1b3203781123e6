"""The recipe's training run for every method: setup, the engine's loop (``training.engine``) with evaluation and
checkpoints that resume exactly after each step, publishing."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..atomic import atomic_directory, commit_directory, staging_path, write_file_atomic
from ..data.loading import load_task
from ..errors import CheckpointError, ConfigError
from ..hub import push_adapter_to_hub, write_model_card
from ..metrics import compute_metrics
from ..s3.protocol import probe_features
from .alternating import DirectionSchedule
from .assembly import build_base, build_loaders, prepare_output_dir, resolve_towers, with_adapter, write_dropped_rows
from .checkpoint import (
    STATE_FILE,
    TrainingState,
    check_adapter_keys,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
    write_manifest,
)
from .config import TrainConfig
from .engine import Engine, StepOutput
from .evaluation import Evaluation, PlotTarget
from .features import FeatureConnector, cached_feature_loaders
from .methods import (
    METHODS,
    RETRIEVAL_METHODS,
    UNUSED_PARAMETER_METHODS,
    method_config,
    method_hooks,
)
from .probes import fit_linear_probe, pooled_features

logger = logging.getLogger(__name__)
LAUNCHER_WORLD_SIZES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def check_process_group(accelerator: Accelerator) -> None:
    """Refuse to train when a launcher started several processes that did not join one process group."""
    for variable in LAUNCHER_WORLD_SIZES:
        launched = int(os.environ.get(variable, "1") or 1)
        if launched > 1 and accelerator.num_processes != launched:
            raise RuntimeError(
                f"The launcher started {launched} processes ({variable}={launched}) but they did not form one process "
                f"group (this process sees {accelerator.num_processes}); each would train alone on the full data. "
                "On CPUs use `accelerate launch --cpu --num_processes N --mpirun_hostfile <file>` (OpenMPI) or "
                "`torchrun --nproc_per_node N`; on GPUs `accelerate launch --multi_gpu`."
            )


def data_position(step: int, micro_batches_per_epoch: int, accumulation: int) -> tuple[int, int]:
    """(epoch, micro-batches of it already used) after ``step`` optimiser steps. Accelerate ends an accumulation at
    the end of the data, so an epoch is ``ceil(micro_batches_per_epoch / accumulation)`` steps, its last one shorter
    when the two do not divide."""
    steps_per_epoch = math.ceil(micro_batches_per_epoch / accumulation)
    epoch, within = divmod(step, steps_per_epoch)
    return epoch, within * accumulation


class Trainer:
    """Train one adapter on one task: ``Trainer(config).train()`` returns the final metrics."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
            if config.method in UNUSED_PARAMETER_METHODS else None,
        )
        check_process_group(self.accelerator)
        set_seed(config.seed)
        self.state = TrainingState()

    # ---- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load data, towers and adapter; build loaders, optimizer and scheduler; resume if asked."""
        config, accelerator = self.config, self.accelerator
        prepare_output_dir(config, accelerator)
        self.writer_pid = broadcast_object_list([os.getpid()])[0]  # names the checkpoint staging folders
        self.feature_task = config.feature_task  # frozen random feature towers instead of image and text towers
        towers = None if self.feature_task else resolve_towers(config, accelerator)
        with accelerator.main_process_first():
            self.task = load_task(config.dataset, data_dir=config.data_dir, train_size=config.train_size,
                                  eval_size=config.eval_size, seed=config.seed, image_size=config.image_size,
                                  strict=config.strict_data, max_rows=config.max_train_rows,
                                  **config.dataset_kwargs)
        self.retrieval = self.task.task_type == "retrieval"
        if self.retrieval and config.method not in RETRIEVAL_METHODS:
            raise ConfigError("method", f"--dataset {config.dataset} is a retrieval task, which trains a connector "
                                        f"method ({sorted(RETRIEVAL_METHODS)}); --method {config.method} needs a "
                                        "labelled task such as synthetic:entailment or synthetic:multilabel.")
        if not self.retrieval and config.method in RETRIEVAL_METHODS:
            raise ConfigError("method", f"--method {config.method} aligns the two towers on a retrieval task (such as "
                                        f"synthetic:retrieval); --dataset {config.dataset} is a "
                                        f"{self.task.task_type} task, which the methods "
                                        f"{sorted(set(METHODS) - RETRIEVAL_METHODS)} train.")
        if accelerator.is_main_process:
            write_dropped_rows(config, self.task)
        self.multi_label = self.task.task_type == "multi_label_classification"
        peft_config = method_config(config.method, config.method_kwargs)
        self.base = build_base(config, self.task, peft_config, towers, accelerator)
        self.model = with_adapter(self.base, peft_config)
        data = build_loaders(config, self.task, self.base, towers)
        self.collator, self.train_loader, self.eval_loader = data.collator, data.train_loader, data.eval_loader
        self.probe_loaders = data.probe_loaders
        trained = self.model
        if config.cache_features:  # the towers run once per image and caption; training reads their stored features
            trained, self.train_loader, self.eval_loader = cached_feature_loaders(self, self.task.dataset["train"],
                                                                                  data.eval_split)
        steps_per_epoch = math.ceil(len(self.train_loader) / accelerator.num_processes /
                                    config.gradient_accumulation_steps)
        self.max_steps = config.max_steps or steps_per_epoch * config.num_epochs
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                      lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer,
                                  num_warmup_steps=config.warmup_steps * accelerator.num_processes,
                                  num_training_steps=self.max_steps * accelerator.num_processes)
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.lr_scheduler = accelerator.prepare(
            trained, optimizer, self.train_loader, self.eval_loader, scheduler)
        # resolved once per run: the direction schedule (None unless the adapter has directions) and the method's hooks
        self.direction_schedule = DirectionSchedule.for_model(self.model)
        self.hooks = method_hooks(accelerator.unwrap_model(self.model))
        accelerator.register_save_state_pre_hook(self._keep_adapter_weights_only)
        if config.report_to != "none":
            accelerator.init_trackers("mmexperts", {k: v for k, v in vars(config).items()
                                                    if isinstance(v, (int, float, str, bool))})
        if config.resume_from_checkpoint:
            self._resume(config.resume_from_checkpoint)

    def _adapter_keys(self, model, state: dict) -> set[str]:
        """Keys of ``state`` that checkpoints hold: the adapter and head, not the frozen backbones."""
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        prefix = self.accelerator.unwrap_model(model).base_model.prefix
        return {key for key in state if key in trainable or prefix in key or "modules_to_save" in key}

    def _keep_adapter_weights_only(self, models, weights, output_dir) -> None:
        for model, state in zip(models, weights):
            for key in set(state) - self._adapter_keys(model, state):
                del state[key]

    def _resume(self, checkpoint: str) -> None:
        """Load a verified checkpoint: adapter keys must match exactly; missing RNG states lose exactness (a warning,
        or an error with ``strict_resume``)."""
        accelerator = self.accelerator
        if checkpoint == "latest":
            path, skipped = latest_checkpoint(self.output_dir / "checkpoints")
            for reason in skipped:
                accelerator.print(f"Skipped checkpoint {reason}")
        else:
            path = Path(checkpoint)
        rng_problems = verify_checkpoint(path)
        rng_file = path / f"random_states_{accelerator.process_index}.pkl"
        if not rng_file.is_file() and not rng_problems:
            rng_problems = [f"{rng_file.name} is missing (the checkpoint was written by fewer processes)"]
        if rng_problems:
            message = (f"Checkpoint {path}: {'; '.join(rng_problems)}, so the random state cannot be restored and this "
                       "resumed run will not exactly repeat an uninterrupted one.")
            if self.config.strict_resume:
                raise CheckpointError(f"{message} Resume from another checkpoint, or drop --strict_resume.")
            logger.warning(message)
            accelerator.print(f"WARNING: {message}")
        check_adapter_keys(path, self._adapter_keys(self.model, self.model.state_dict()))
        state = TrainingState.from_file(path / STATE_FILE)
        accelerator.load_state(str(path), strict=False)  # frozen backbone weights are not in checkpoints
        self.state = state
        accelerator.print(f"Resumed from {path} at step {self.state.step}.")

    # ---- training ----------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run the whole job; returns the final metrics (also written to ``output_dir/metrics.json``)."""
        if not hasattr(self, "model"):
            self.setup()
        config, accelerator = self.config, self.accelerator
        micro_per_epoch = len(self.train_loader)
        if micro_per_epoch == 0:
            raise ValueError(f"The training split has fewer rows than one batch (batch_size={config.batch_size} per "
                             f"process, {accelerator.num_processes} processes); lower batch_size or add data.")
        engine = self.engine()
        progress = tqdm(total=self.max_steps, initial=self.state.step, desc="training",
                        disable=not accelerator.is_local_main_process)
        self.train_mode()
        while self.state.step < self.max_steps:
            # where the run stands in the data is a function of the step, so a resumed run continues the same batches
            epoch, skip = data_position(self.state.step, micro_per_epoch, config.gradient_accumulation_steps)
            self.train_loader.set_epoch(epoch)
            loader = accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
            engine.run(loader, self.max_steps, progress=progress, callbacks=[self._after_step])
        progress.close()
        return self.finish()

    def engine(self) -> Engine:
        """The engine over this run's prepared model, optimizer and scheduler, continuing ``self.state``."""
        config = self.config
        return Engine(self.model, self.optimizer, self.lr_scheduler, accelerator=self.accelerator,
                      max_grad_norm=config.max_grad_norm, direction_schedule=self.direction_schedule, hooks=self.hooks,
                      model_inputs=self.model_inputs, max_nonfinite_in_a_row=config.max_nonfinite_in_a_row,
                      state=self.state)

    def _after_step(self, out: StepOutput) -> None:
        self.on_step_end(out.loss)

    def train_mode(self) -> None:
        """Training mode for the adapter; the frozen towers' own dropout follows ``frozen_dropout``."""
        self.model.train()
        if not self.config.frozen_dropout:
            set_frozen_modules_eval(self.model)

    def on_step_end(self, loss: float) -> None:
        """Logging, periodic evaluation and checkpoints after each optimizer step."""
        config, step = self.config, self.state.step
        if step % config.logging_steps == 0:
            self.accelerator.log({"train/loss": loss, "train/lr": self.lr_scheduler.get_last_lr()[0]}, step=step)
        if step % config.eval_steps == 0 and step < self.max_steps:
            self.evaluate_and_keep_best()
        if step % config.save_steps == 0:
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """``save_state`` and the progress JSON into a staging folder, the manifest last, then a durable swap; old
        checkpoints beyond ``save_total_limit`` go."""
        accelerator = self.accelerator
        root = self.output_dir / "checkpoints"
        target = root / f"step_{self.state.step}"
        staging = staging_path(target, self.writer_pid)
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_file_atomic(staging / STATE_FILE, self.state.to_json())
            write_manifest(staging, self.state.step)
            commit_directory(staging, target)
            for stale in [p for p in list_checkpoints(root) if checkpoint_step(p) > self.state.step]:
                logger.warning("Removed %s: it continues a run this one resumed before and replaced.", stale)
                shutil.rmtree(stale)
            for old in list_checkpoints(root)[:-self.config.save_total_limit]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return target

    def model_inputs(self, batch: dict, return_loss: bool = True) -> dict:
        """The model's keyword arguments for a batch (the method's hook: retrieval batches drop their image ids and
        ask for the loss)."""
        return self.hooks.model_inputs(batch, return_loss)

    def evaluate(self) -> Evaluation:
        """The method's evaluation (``MethodHooks.evaluate``) of the model on the evaluation split, in eval mode."""
        self.model.eval()
        try:
            return self.hooks.evaluate(self.model, self.eval_loader, self.accelerator, self.model_inputs,
                                       self.multi_label)
        finally:
            self.train_mode()

    @property
    def main_metric(self) -> str:
        return self.hooks.main_metric(self.multi_label)

    def evaluate_and_keep_best(self) -> dict:
        metrics = self.evaluate().metrics
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.state.step)
        self.accelerator.print(f"step {self.state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        value = metrics[self.main_metric]
        if self.state.best_metric is None or value > self.state.best_metric:
            self.state.best_metric, self.state.best_step = value, self.state.step
            self.save_adapter(self.output_dir / "best")
        return metrics

    def save_adapter(self, folder: Path) -> None:
        """Write the adapter with PEFT's ``save_pretrained``, atomically, from the main process."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with atomic_directory(folder) as staging:
                self.accelerator.unwrap_model(self.model).save_pretrained(staging)
        self.accelerator.wait_for_everyone()

    # ---- results -----------------------------------------------------------------------------------------------
    def unimodal_baselines(self) -> dict[str, float]:
        """Scores of linear probes on each frozen tower alone (the base model with the adapter disabled): vision and
        text, or a feature task's modality_a and modality_b."""
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, FeatureConnector):  # trained from cached features: the probes read the towers
            model = model.peft_model
        if self.feature_task:  # the feature encoder's pooled towers, side by side: one half per modality
            (train_x, train_labels, _), (eval_x, eval_labels, _) = (probe_features(model, loader, adapter=False)
                                                                    for loader in self.probe_loaders)
            modalities, width = ("modality_a", "modality_b"), self.base.config.hidden_size
            train_features, eval_features = ({m: x[:, i * width:(i + 1) * width] for i, m in enumerate(modalities)}
                                             for x in (train_x, eval_x))
        else:
            modalities = ("vision", "text")
            with model.disable_adapter():
                train_features, train_labels = pooled_features(model, self.probe_loaders[0])
                eval_features, eval_labels = pooled_features(model, self.probe_loaders[1])
        scores = {}
        for modality in modalities:
            logits = fit_linear_probe(train_features[modality], train_labels, eval_features[modality],
                                      self.multi_label, len(self.task.label_names), seed=self.config.seed)
            scores[modality] = compute_metrics(logits.numpy(), eval_labels.numpy(), self.multi_label)[self.main_metric]
        return scores

    @property
    def base_seed(self) -> int | None:
        """The torch seed the frozen random feature towers were drawn from (None for pretrained towers)."""
        return self.config.seed if self.feature_task else None

    def finish(self) -> dict:
        """Final evaluation, adapter, metrics, routing plot, model card; optionally push to the Hub."""
        config, accelerator = self.config, self.accelerator
        evaluation = self.evaluate()
        metrics = evaluation.metrics
        if self.state.best_metric is None or metrics[self.main_metric] >= self.state.best_metric:
            self.state.best_metric, self.state.best_step = metrics[self.main_metric], self.state.step
            self.save_adapter(self.output_dir / "best")
        self.save_adapter(self.output_dir / "adapter")
        results = {"method": config.method, "dataset": config.dataset, "steps": self.state.step,
                   "best_step": self.state.best_step, "nonfinite_steps": self.state.nonfinite_steps,
                   **{f"eval_{k}": v for k, v in metrics.items()}}
        if config.unimodal_baselines and accelerator.is_main_process and not self.retrieval:
            for modality, score in self.unimodal_baselines().items():
                results[f"{modality}_only_{self.main_metric}"] = score
        results = {k: round(float(v), 4) if isinstance(v, (float, np.floating)) else v for k, v in results.items()}
        model = accelerator.unwrap_model(self.model)
        if accelerator.is_main_process:
            plots = self.hooks.plots(model, evaluation, PlotTarget(self.output_dir / "adapter", config.method,
                                                                   config.dataset, self.task.eval_split,
                                                                   self.task.label_names))
            card_metrics = {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in results.items()}
            # best/ gets the same card as adapter/ (not PEFT's empty one), with the figures of the step it was kept at
            best_metrics = {**{k: v for k, v in card_metrics.items()
                               if not k.startswith("eval_") or self.state.best_step == self.state.step},
                            "steps": self.state.best_step, f"eval_{self.main_metric}": f"{self.state.best_metric:.4f}"}
            for name, shown, listed in (("adapter", card_metrics, list(plots)), ("best", best_metrics, [])):
                write_model_card(model, self.output_dir / name, config.hub_model_id, dataset=config.dataset,
                                 metrics=shown, routing_plot="routing.png" if "routing.png" in listed else None,
                                 plots=listed, base_seed=self.base_seed,
                                 adapter_path=str((self.output_dir / name).resolve()))  # the snippet loads it there
            write_file_atomic(self.output_dir / "metrics.json", json.dumps(results, indent=2))
            print(results_table(results))
            if config.push_to_hub:
                push_adapter_to_hub(model, config.hub_model_id, dataset=config.dataset, metrics=card_metrics,
                                    extra_files=plots or None, base_seed=self.base_seed)
            where = self.output_dir.resolve()
            checkpoints = list_checkpoints(where / "checkpoints")
            lines = [f"Wrote to {where}:",
                     f"  adapter/      final adapter, model card (README.md){''.join(f', {n}' for n in plots)}",
                     (f"  best/         best adapter (step {self.state.best_step}, eval_{self.main_metric} "
                      f"{self.state.best_metric:.4f})"),
                     f"  checkpoints/  {', '.join(p.name for p in checkpoints) or 'none'}",
                     "  metrics.json  the table above"]
            if (where / "dropped_rows.json").exists():
                lines.append("  dropped_rows.json  the bad rows dropped from the data")
            if config.push_to_hub:
                lines.append(f"  pushed to https://huggingface.co/{config.hub_model_id}")
            print("\n".join(lines))
        accelerator.end_training()
        return results


def set_frozen_modules_eval(model: torch.nn.Module) -> None:
    """Eval mode (no dropout) for every module whose parameters are all frozen; modules with trainable parameters
    (adapters, heads) and their own dropout stay in training mode."""
    for module in model.modules():
        parameters = list(module.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            module.eval()


def results_table(results: dict) -> str:
    """A markdown table of a run's results."""
    rows = [f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in results.items()]
    return "\n".join(["| metric | value |", "| --- | --- |", *rows])


def train(config: TrainConfig) -> dict:
    """Train an adapter as described by ``config``; returns the final metrics."""
    return Trainer(config).train()
