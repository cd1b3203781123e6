"""The S3 sweeps on two-modality feature data, both designs through one entry point (:func:`sparsity_sweep`).

``design="concepts"`` (default), the expert-pruning sweep: train once, then for each sparsity prune, fine-tune,
evaluate. Per seed: a :class:`~mmexperts.FeatureEncoderForClassification` with frozen towers gets an S3 adapter,
which trains on the task (after an optional self-supervised Specialization stage). For every sparsity of the grid the
trained adapter is restored, pruned on the validation split (utility criterion and pruning schedule as configured), its
router and heads are fine-tuned briefly (the unpruned level too), and validation and test accuracy are recorded.
Results: a CSV, a PNG of accuracy against sparsity (mean and std over seeds) and a PNG of expert usage per class.

``design="paper"``, the paper's granularity x keep-ratio sweep. Per seed and granularity chi, the frozen feature
encoder of that seed gets a paper-design adapter ``S3Config.from_granularity(chi, expansion)`` (N = chi * rho experts,
top-chi). Stage 1 (Specialization, no labels) trains the whole adapter, and a linear probe on its ``fused_embeds``
(fitted on train, scored on test) gives the specialization-only accuracy; stage 2 (Selection) trains the routers only,
with labels (SupCon + compactness; ``stage2_epochs=0`` skips it); then for every keep ratio p each batch keeps its top-p
routing pairs (stage 3, no retraining) and a linear probe is fitted and scored again, with the measured fraction of
pairs kept. Results: a CSV (one row per seed, granularity and keep ratio, each with its stage-1-only accuracy) and a
PNG of accuracy against keep ratio, one line per granularity (mean and std over seeds).

Both write as they go and resume: ``config.json`` first, then ``sweep.csv`` again after every cell, the trained
adapters under ``state/`` (per seed; paper: per seed and granularity, after stage 2) and the plots as they go, every
file atomically. Each cell draws its randomness from its own seed (seed and sparsity level; paper: seed, granularity
and stage), so a sweep that is killed and started again with the same config skips the cells already in the CSV and
ends with the same CSV as one that ran straight through.

The concepts design's default factor data puts a train-only spurious correlation into modality b's nuisance factors
(validation and test independent). Experts that specialise on modality b's tokens then carry a shortcut that fails on
held-out data; the leave-one-out validation-loss utility ranks them lowest, so moderate pruning raises test accuracy,
and pruning further removes label-relevant experts and lowers it (the reverse U of S3's sparsity finding). The paper
design's default factor data has no shortcut: the label needs the shared, both unique and the synergistic factors.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import peft
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import recover_directory, write_file_atomic
from ..data.collate import FEATURE_COLUMNS, FeatureCollator
from ..docstrings import document_fields
from ..errors import ConfigError, CorruptFileError
from ..metrics import compute_metrics
from ..modeling import FeatureEncoderConfig, FeatureEncoderForClassification
from ..plots import plot_class_usage, plot_keep_ratio_curves, plot_sparsity_curve
from ..renames import current_names
from ..s3.config import DESIGNS, S3Config
from ..s3.protocol import keep_ratio_table, probe_features, summarize_keep_ratios
from .engine import Engine, without
from .probes import fit_linear_probe

CSV_FIELDS = ("seed", "sparsity", "pruned", "active_experts", "validation_accuracy", "test_accuracy", "test_loss")
CSV_TYPES = {"seed": int, "sparsity": float, "pruned": int, "active_experts": str, "validation_accuracy": float,
             "test_accuracy": float, "test_loss": float}
CSV_FILE, CONFIG_FILE, STATE_FOLDER = "sweep.csv", "config.json", "state"
CURVE_PLOT, USAGE_PLOT = "accuracy_vs_sparsity.png", "expert_usage.png"
KEEP_RATIO_PLOT = "accuracy_vs_keep_ratio.png"
OUTPUTS = (CSV_FILE, CONFIG_FILE, CURVE_PLOT, USAGE_PLOT, KEEP_RATIO_PLOT, STATE_FOLDER, "config.txt")
NOT_COMPARED = ("output_dir", "overwrite_output_dir")  # where the sweep is written does not change its results
PAPER_CSV_FIELDS = ("seed", "granularity", "num_experts", "keep_ratio", "kept_pairs", "test_accuracy",
                    "specialization_accuracy")
PAPER_CSV_TYPES = {"seed": int, "granularity": int, "num_experts": int, "keep_ratio": float, "kept_pairs": float,
                   "test_accuracy": float, "specialization_accuracy": float}
# Fields one design reads and the other ignores (left out of the other design's config.json)
PAPER_FIELDS = ("granularities", "expansion", "keep_ratios", "num_moe_layers", "stage1_epochs", "stage2_epochs",
                "eval_batch_size")
CONCEPT_FIELDS = ("sparsities", "num_experts", "top_k", "head_input", "assignment_temperature", "sharpness_loss_weight",
                  "ssl_loss_weight", "ssl_epochs", "epochs", "finetune_epochs", "criterion",
                  "pruning_schedule")
DATA_DEFAULTS = {"concepts": {"label_from": "shared,unique_a", "spurious_strength": 0.9},
                 "paper": {"label_from": "shared,unique_a,unique_b,synergy", "spurious_strength": 0.0}}
SPECIALIZATION_KEY = "sweep.specialization_accuracy"  # stored beside the adapter weights in state/


@document_fields
@dataclass
class SweepConfig:
    """Everything one sweep needs; every field is also a ``recipes/sweep_s3.py`` option. Fields marked (concepts)
    or (paper) apply to that design's sweep only."""

    # earlier name -> current name; config files and sweep folders written before the rename read back as the new name
    renamed_fields: ClassVar[dict[str, str]] = {"latent_dim": "latent_size", "schedule": "pruning_schedule"}

    design: str = field(default="concepts", metadata={
        "help": "'concepts': the expert-pruning sparsity sweep of S3's concepts design; 'paper': the paper design's "
                "granularity x keep-ratio sweep (stage 1, stage 2, then a linear probe at every keep ratio)."})
    dataset: str = field(default="factors", metadata={
        "help": "'factors' (synthetic, offline) or 'multibench:<name>' (mosi, mosei, sarcasm, humor, mimic) with "
                "data_dir."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the MultiBench pickles."})
    num_train: int = field(default=600, metadata={"help": "Factor data: training examples."})
    num_eval: int = field(default=400, metadata={"help": "Factor data: validation and test examples (each)."})
    label_from: str | None = field(default=None, metadata={
        "help": "Factor data: comma-separated factor groups the label depends on; the others are irrelevant. None: "
                "'shared,unique_a' (concepts), 'shared,unique_a,unique_b,synergy' (paper)."})
    spurious_strength: float | None = field(default=None, metadata={
        "help": "Factor data: how strongly the nuisance (noise) factors agree with the label in train only, in "
                "[0, 1]; validation and test stay independent (a train/test shift that pruning can undo). None: 0.9 "
                "(concepts), 0 (paper)."})
    spurious_modalities: str = field(default="b", metadata={
        "help": "Factor data: whose noise factors are spurious: 'a', 'b' or 'ab'."})
    sparsities: str = field(default="0,0.125,0.25,0.375,0.5,0.625,0.75,0.875", metadata={
        "help": "(concepts) Comma-separated fractions of experts to prune, each in [0, 1)."})
    seeds: str = field(default="0,1,2", metadata={"help": "Comma-separated seeds."})
    granularities: str = field(default="1,2,4", metadata={
        "help": "(paper) Comma-separated granularities chi: each MoE layer has chi * expansion experts, chi per "
                "token."})
    expansion: int = field(default=2, metadata={"help": "(paper) Expansion ratio rho: num_experts = chi * rho."})
    keep_ratios: str = field(default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", metadata={
        "help": "(paper) Comma-separated keep ratios p in (0, 1]: the fraction of each batch's top-k (token, expert) "
                "routing pairs kept at inference."})
    num_moe_layers: int = field(default=1, metadata={"help": "(paper) MoE encoder layers per modality."})
    stage1_epochs: int = field(default=10, metadata={"help": "(paper) Specialization epochs (self-supervised)."})
    stage2_epochs: int = field(default=5, metadata={
        "help": "(paper) Selection epochs (routers only, with labels); 0 skips stage 2."})
    eval_batch_size: int = field(default=256, metadata={
        "help": "(paper) Batch size of the probe's feature passes; the keep ratio keeps the top pairs of each batch."})
    num_experts: int = field(default=8, metadata={"help": "(concepts) Concept experts K."})
    latent_size: int = field(default=32, metadata={"help": "Shared latent width d."})
    top_k: int | None = field(default=None, metadata={"help": "(concepts) Router top-k (None: soft gating)."})
    head_input: str = field(default="concat", metadata={"help": "(concepts) What the heads read: 'concat' or 'sum'."})
    assignment_temperature: float = field(default=0.5, metadata={
        "help": "(concepts) Temperature of the token-to-concept assignment (lower: each token goes to fewer "
                "concepts)."})
    sharpness_loss_weight: float = field(default=0.01, metadata={
        "help": "(concepts) Weight of the assignment-entropy loss."})
    ssl_loss_weight: float = field(default=0.0, metadata={
        "help": "(concepts) Weight of the per-concept InfoNCE in training."})
    ssl_epochs: int = field(default=0, metadata={
        "help": "(concepts) Self-supervised Specialization epochs before training."})
    hidden_size: int = field(default=40, metadata={"help": "Width of the frozen feature towers."})
    num_hidden_layers: int = field(default=1, metadata={"help": "Blocks per frozen feature tower."})
    epochs: int = field(default=40, metadata={"help": "(concepts) Supervised training epochs of the full adapter."})
    finetune_epochs: int = field(default=10, metadata={
        "help": "(concepts) Router + head fine-tune epochs after pruning."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=64, metadata={"help": "Batch size."})
    criterion: str = field(default="loss", metadata={
        "help": "(concepts) Utility: loss, gate_mass, usage or gate_output_norm."})
    pruning_schedule: str = field(default="progressive", metadata={
        "help": "(concepts) How experts are pruned: one-shot (all at once) or progressive (one at a time, "
                "rescoring)."})
    num_threads: int = field(default=1, metadata={
        "help": "Torch CPU threads while the sweep runs. Its models are tiny, so one thread is fastest; more threads "
                "gain nothing and, on a machine whose cores are busy, make every step many times slower."})
    output_dir: str = field(default="outputs/s3-sweep", metadata={
        "help": "Where the CSV, its config.json, the plots and state/ go. A folder holding an unfinished sweep of the "
                "same config is resumed (finished cells are skipped); one of another config is refused."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an output_dir that holds a sweep: its sweep.csv, config.json, plots and state/ are "
                "removed first."})

    def __post_init__(self):
        if self.design not in DESIGNS:
            raise ConfigError("design", f"--design must be one of {list(DESIGNS)}, got {self.design!r}.")
        for name, default in DATA_DEFAULTS[self.design].items():
            if getattr(self, name) is None:
                setattr(self, name, default)

    @property
    def sparsity_grid(self) -> list[float]:
        return [float(s) for s in str(self.sparsities).split(",") if s.strip()]

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in str(self.seeds).split(",") if s.strip()]

    @property
    def granularity_grid(self) -> list[int]:
        return [int(s) for s in str(self.granularities).split(",") if s.strip()]

    @property
    def keep_ratio_grid(self) -> list[float]:
        return [float(s) for s in str(self.keep_ratios).split(",") if s.strip()]


def load_feature_data(config: SweepConfig, seed: int):
    """The sweep's ``DatasetDict`` (train/validation/test with modality_a, modality_b, label)."""
    if config.dataset == "factors":
        from ..offline.factors import build_factor_dataset

        return build_factor_dataset(num_train=config.num_train, num_validation=config.num_eval,
                                    num_test=config.num_eval, label_from=tuple(config.label_from.split(",")),
                                    spurious_strength=config.spurious_strength,
                                    spurious_modalities=tuple(config.spurious_modalities), seed=seed)
    if config.dataset.startswith("multibench:"):
        from ..data.multibench import load_multibench

        if not config.data_dir:
            raise ConfigError("data_dir", f"--dataset {config.dataset!r} needs --data_dir, the folder holding its "
                                          "pickle.")
        return load_multibench(config.dataset.split(":", 1)[1], config.data_dir)
    raise ConfigError("dataset", f"--dataset must be 'factors' or 'multibench:<name>', got {config.dataset!r}.")


def feature_loader(split, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of ``features_a``, ``features_b``, ``labels`` (and ``task_ids``) from a feature-data split."""
    columns = [c for c in FEATURE_COLUMNS if c in split.column_names]
    return DataLoader(split.with_format("torch", columns=columns), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed), collate_fn=FeatureCollator())


def feature_encoder(data, config: SweepConfig) -> FeatureEncoderForClassification:
    """A feature encoder sized for ``data`` (random init from the current torch seed); PEFT freezes it."""
    example = data["train"][0]
    return FeatureEncoderForClassification(FeatureEncoderConfig(
        feature_size_a=len(example["modality_a"][0]), feature_size_b=len(example["modality_b"][0]),
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_labels=data["train"].features["label"].num_classes))


def with_adapter(base: torch.nn.Module, s3: S3Config) -> peft.PeftModel:
    with warnings.catch_warnings():  # PEFT reads the deprecated `is_gradient_checkpointing`; only that is hidden
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return peft.get_peft_model(base, s3)


def build_model(data, config: SweepConfig, seed: int) -> peft.PeftModel:
    """A frozen feature encoder sized for ``data`` with a fresh S3 adapter of the concepts design."""
    torch.manual_seed(seed)
    base = feature_encoder(data, config)
    return with_adapter(base, S3Config(
        design="concepts", num_experts=config.num_experts, latent_size=config.latent_size, top_k=config.top_k,
        head_input=config.head_input, assignment_temperature=config.assignment_temperature,
        sharpness_loss_weight=config.sharpness_loss_weight, ssl_loss_weight=config.ssl_loss_weight))


def paper_s3_config(config: SweepConfig, granularity: int) -> S3Config:
    """The paper-design adapter of granularity chi: ``chi * expansion`` experts per MoE layer, top-chi, no head (the
    sweep fits its linear probes after training)."""
    return S3Config.from_granularity(granularity, config.expansion, latent_size=config.latent_size,
                                     num_layers=config.num_moe_layers, num_labels=0, dispatch="dense")


def build_paper_model(data, config: SweepConfig, seed: int, granularity: int) -> peft.PeftModel:
    """The seed's frozen feature encoder (the same towers for every granularity) with a fresh paper-design adapter."""
    torch.manual_seed(seed)
    base = feature_encoder(data, config)
    return with_adapter(base, paper_s3_config(config, granularity))


@contextmanager
def only_trainable(model: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Temporarily train only ``params`` (the others keep their values and get no gradients)."""
    chosen = {id(p) for p in params}
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(previous[name])


def fit(model: torch.nn.Module, loader: DataLoader, epochs: int, learning_rate: float, weight_decay: float,
        labels: bool = True, description: str | None = None) -> None:
    """AdamW over the trainable parameters through the training engine (clipping 1.0, no learning-rate scheduler);
    ``labels=False`` drops labels (the self-supervised stage).

    With a ``description``, a progress bar counts the steps (it disappears when done).
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=weight_decay)
    engine = Engine(model, optimizer, max_grad_norm=1.0, skip_nonfinite=False,
                    model_inputs=None if labels else without("labels"))
    model.train()
    total = epochs * len(loader) if hasattr(loader, "__len__") else None
    shown = {} if description else {"disable": True}  # an unset `disable` leaves TQDM_DISABLE in charge
    with tqdm(total=total, desc=description, unit="step", leave=False, **shown) as progress:
        for _ in range(epochs):
            engine.run(loader, progress=progress)
    model.eval()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """Accuracy and mean task loss of an S3 model with a head."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        logits.append(model(**batch).logits.float())
        labels.append(batch["labels"])
    logits, labels = torch.cat(logits), torch.cat(labels)
    loss = float(model.base_model.task_loss(logits, labels))
    return {**compute_metrics(logits.numpy(), labels.numpy(), multi_label=False), "loss": loss}


def prune_and_finetune(model: peft.PeftModel, sparsity: float, validation: list[dict], train: DataLoader,
                       config: SweepConfig, description: str | None = None) -> torch.Tensor:
    """Prune to ``sparsity`` by validation utility, then fine-tune the router and heads; returns the expert mask.

    The unpruned level gets the same fine-tune, so every level has had the same training.
    """
    tuner = model.base_model
    mask = tuner.prune(sparsity, validation, criterion=config.criterion,
                       pruning_schedule=config.pruning_schedule)
    if config.finetune_epochs:
        with only_trainable(model, tuner.router_and_head_parameters()):
            fit(model, train, config.finetune_epochs, config.learning_rate, config.weight_decay,
                description=description)
    return mask


CONCEPTS_CELL, PAPER_CELL = ("seed", "sparsity"), ("seed", "granularity", "keep_ratio")  # the CSV fields naming a cell


def cell_of(row: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(row[name] for name in fields)


def finished_cells(rows: list[dict], order: dict[tuple, int], fields: tuple[str, ...], out: Path) -> set[tuple]:
    """The grid cells the CSV already holds (says so when resuming); a row outside the grid refuses the folder."""
    done = {cell_of(row, fields) for row in rows}
    if done - set(order):
        raise CorruptFileError(out / CSV_FILE, f"rows {sorted(done - set(order))} are not cells of this sweep's "
                                               "grid; pass --overwrite_output_dir to start over.")
    if done:
        print(f"Resuming: {len(done)} of {len(order)} cells are already in {out / CSV_FILE}.", flush=True)
    return done


def cell_seed(seed: int, *keys: int) -> int:
    """The seed of one cell, e.g. (seed, sparsity level): its randomness does not depend on which cells ran before."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


class SeedRun:
    """One seed of the sweep: its data, model and loaders, and the adapter as trained before any pruning."""

    def __init__(self, config: SweepConfig, seed: int, state_folder: Path):
        self.config, self.seed = config, seed
        self.data = load_feature_data(config, seed)
        self.model = build_model(self.data, config, seed)
        self.validation = list(feature_loader(self.data["validation"], 256))
        self.test = feature_loader(self.data["test"], 256)
        self.trained = self._load_or_train(state_folder / f"seed_{seed}.safetensors")

    def _load_or_train(self, path: Path) -> dict[str, torch.Tensor]:
        """The trained adapter of this seed: read from ``path`` when a previous run saved it, else trained now and
        saved there."""
        if path.is_file():
            trained = load_tensors(path.read_bytes())
            peft.set_peft_model_state_dict(self.model, trained)
            return trained
        config, seed = self.config, self.seed
        train = feature_loader(self.data["train"], config.batch_size, shuffle=True, seed=seed)
        if config.ssl_epochs:
            fit(self.model, train, config.ssl_epochs, config.learning_rate, config.weight_decay, labels=False,
                description=f"seed {seed}: self-supervised")
        fit(self.model, train, config.epochs, config.learning_rate, config.weight_decay,
            description=f"seed {seed}: training")
        trained = {k: v.detach().clone().contiguous() for k, v in peft.get_peft_model_state_dict(self.model).items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, save_tensors(trained))
        return trained

    def routing(self) -> dict:
        """The trained (unpruned) model's routing weights (examples, K) and labels on the test split."""
        peft.set_peft_model_state_dict(self.model, self.trained)
        routing = self.model.base_model.routing_statistics(self.test)
        routing["label_names"] = self.data["test"].features["label"].names
        return routing

    def cell(self, level: int, sparsity: float) -> dict:
        """Restore the trained adapter, prune to ``sparsity``, fine-tune, evaluate: one row of the CSV."""
        config, model = self.config, self.model
        seed = cell_seed(self.seed, level)
        torch.manual_seed(seed)
        peft.set_peft_model_state_dict(model, self.trained)
        train = feature_loader(self.data["train"], config.batch_size, shuffle=True, seed=seed)
        mask = prune_and_finetune(model, sparsity, self.validation, train, config,
                                  description=f"seed {self.seed}, sparsity {sparsity:g}: fine-tune")
        scores = evaluate(model, self.test)
        return {"seed": self.seed, "sparsity": sparsity, "pruned": int((~mask).sum()),
                "active_experts": " ".join(map(str, mask.nonzero().flatten().tolist())),
                "validation_accuracy": float(evaluate(model, self.validation)["accuracy"]),
                "test_accuracy": float(scores["accuracy"]), "test_loss": float(scores["loss"])}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std of test accuracy per sparsity over seeds."""
    table = []
    for sparsity in sorted({row["sparsity"] for row in rows}):
        values = np.array([row["test_accuracy"] for row in rows if row["sparsity"] == sparsity])
        pruned = next(row["pruned"] for row in rows if row["sparsity"] == sparsity)
        table.append({"sparsity": sparsity, "pruned": pruned, "mean": float(values.mean()),
                      "std": float(values.std()), "seeds": len(values)})
    return table


# ---- the paper design: three stages, linear probes, the keep-ratio sweep ---------------------------------------------
def probe_accuracy(model: peft.PeftModel, train, test, seed: int, adapter: bool = True,
                   num_labels: int = 2) -> tuple[float, int]:
    """The paper's evaluation: a linear probe fitted on ``train``'s features (``fused_embeds``, or the frozen towers'
    pooled outputs with ``adapter=False``) and scored on ``test``; returns its test accuracy and the routing pairs
    kept on ``test``."""
    train_x, train_y, _ = probe_features(model, train, adapter)
    test_x, test_y, pairs = probe_features(model, test, adapter)
    logits = fit_linear_probe(train_x, train_y, test_x, multi_label=False, num_labels=num_labels, seed=seed)
    return float((logits.argmax(-1) == test_y).float().mean()), pairs


def keep_ratio_probe(model: peft.PeftModel, train, test, seed: int, keep_ratio: float, num_labels: int = 2,
                     unpruned_pairs: int | None = None) -> dict:
    """Stage 3 at one keep ratio: ``{"keep_ratio", "kept_pairs", "test_accuracy"}`` of the linear probe on the
    sparsified ``fused_embeds``; ``kept_pairs`` is measured on ``test``, as a fraction of the unpruned pairs
    (``unpruned_pairs``, counted here when not given). The model is left at keep ratio 1."""
    tuner = model.base_model
    if unpruned_pairs is None:
        tuner.set_keep_ratio(1.0)
        unpruned_pairs = probe_features(model, test)[2]
    tuner.set_keep_ratio(keep_ratio)
    try:
        accuracy, pairs = probe_accuracy(model, train, test, seed, num_labels=num_labels)
    finally:
        tuner.set_keep_ratio(1.0)
    return {"keep_ratio": keep_ratio, "kept_pairs": round(pairs / unpruned_pairs, 4), "test_accuracy": accuracy}


def keep_ratio_sweep(model: peft.PeftModel, train, test, seed: int, ratios: list[float],
                     num_labels: int = 2) -> list[dict]:
    """:func:`keep_ratio_probe` at every keep ratio of ``ratios``."""
    model.base_model.set_keep_ratio(1.0)
    unpruned = probe_features(model, test)[2]
    return [keep_ratio_probe(model, train, test, seed, ratio, num_labels, unpruned) for ratio in ratios]


def specialize(model: peft.PeftModel, train: DataLoader, epochs: int, learning_rate: float, weight_decay: float,
               description: str | None = None) -> None:
    """Stage 1, Specialization: every adapter parameter trains on the self-supervised losses (labels unused)."""
    model.base_model.set_stage("specialization")
    fit(model, train, epochs, learning_rate, weight_decay, labels=False, description=description)


def select(model: peft.PeftModel, train: DataLoader, epochs: int, learning_rate: float, weight_decay: float,
           description: str | None = None) -> None:
    """Stage 2, Selection: only the routers train, with labels (cross-modal SupCon + compactness)."""
    tuner = model.base_model
    tuner.set_stage("selection")
    with only_trainable(model, tuner.selection_parameters()):
        fit(model, train, epochs, learning_rate, weight_decay, description=description)


def three_stages(model: peft.PeftModel, train: DataLoader, train_eval, test, seed: int, ratios: list[float],
                 stage1_epochs: int, stage2_epochs: int, learning_rate: float, weight_decay: float = 1e-2,
                 num_labels: int = 2, specialization_ratios: list[float] | None = None) -> dict[str, list[dict]]:
    """The paper's protocol on a paper-design adapter: stage 1, the probes after it at ``specialization_ratios``
    (default: ``ratios``), stage 2 (skipped at 0 epochs), the probes at ``ratios``. ``train`` shuffles for training,
    ``train_eval`` and ``test`` feed the probes. Returns ``{"specialization": rows, "s3": rows}`` of
    :func:`keep_ratio_probe` rows."""
    specialize(model, train, stage1_epochs, learning_rate, weight_decay)
    ratios_1 = ratios if specialization_ratios is None else specialization_ratios
    rows = {"specialization": keep_ratio_sweep(model, train_eval, test, seed, ratios_1, num_labels)}
    if stage2_epochs:
        select(model, train, stage2_epochs, learning_rate, weight_decay)
    rows["s3"] = keep_ratio_sweep(model, train_eval, test, seed, ratios, num_labels)
    return rows


class PaperRun:
    """One (seed, granularity) of the paper sweep: the adapter after stages 1 and 2 (trained now and saved to
    ``state/``, or read from there when a previous run saved it) and its stage-1-only probe accuracy."""

    def __init__(self, config: SweepConfig, data, seed: int, granularity: int, state_folder: Path):
        self.config, self.seed, self.granularity = config, seed, granularity
        self.num_labels = data["train"].features["label"].num_classes
        self.model = build_paper_model(data, config, seed, granularity)
        self.train_eval = feature_loader(data["train"], config.eval_batch_size)
        self.test = feature_loader(data["test"], config.eval_batch_size)
        self.specialization_accuracy = self._load_or_train(data, state_folder / f"seed_{seed}_chi_{granularity}"
                                                                                ".safetensors")
        self.unpruned_pairs = probe_features(self.model, self.test)[2]

    def _load_or_train(self, data, path: Path) -> float:
        model, tuner = self.model, self.model.base_model
        if path.is_file():
            state = load_tensors(path.read_bytes())
            accuracy = float(state.pop(SPECIALIZATION_KEY))
            peft.set_peft_model_state_dict(model, state)
            tuner.set_stage("selection")
            return accuracy
        config, seed, chi = self.config, self.seed, self.granularity
        name, args = f"seed {seed}, chi {chi}", (config.learning_rate, config.weight_decay)
        torch.manual_seed(cell_seed(seed, chi, 1))  # the views' augmentations
        train = feature_loader(data["train"], config.batch_size, shuffle=True, seed=cell_seed(seed, chi, 1))
        specialize(model, train, config.stage1_epochs, *args, description=f"{name}: stage 1 (specialization)")
        accuracy = probe_accuracy(model, self.train_eval, self.test, seed, num_labels=self.num_labels)[0]
        tuner.set_stage("selection")
        if config.stage2_epochs:
            torch.manual_seed(cell_seed(seed, chi, 2))
            train = feature_loader(data["train"], config.batch_size, shuffle=True, seed=cell_seed(seed, chi, 2))
            select(model, train, config.stage2_epochs, *args, description=f"{name}: stage 2 (selection)")
        state = {k: v.detach().clone().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}
        state[SPECIALIZATION_KEY] = torch.tensor(accuracy, dtype=torch.float64)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, save_tensors(state))
        return accuracy

    def cell(self, keep_ratio: float) -> dict:
        """The linear probe at ``keep_ratio``: one row of the CSV."""
        row = keep_ratio_probe(self.model, self.train_eval, self.test, self.seed, keep_ratio, self.num_labels,
                               self.unpruned_pairs)
        return {"seed": self.seed, "granularity": self.granularity,
                "num_experts": self.granularity * self.config.expansion, **row,
                "specialization_accuracy": self.specialization_accuracy}


def summarize_paper(rows: list[dict]) -> tuple[list[dict], dict[int, tuple[float, float]]]:
    """Mean and std over seeds of the test accuracy per (granularity, keep ratio), and of the stage-1-only accuracy
    per granularity (``{chi: (mean, std)}``)."""
    specialization = {}
    for chi in dict.fromkeys(row["granularity"] for row in rows):
        values = np.array(list({row["seed"]: row["specialization_accuracy"] for row in rows
                                if row["granularity"] == chi}.values()))
        specialization[chi] = (float(values.mean()), float(values.std()))
    return summarize_keep_ratios(rows, by="granularity"), specialization


def granularity_labels(config: SweepConfig, granularities) -> dict[int, str]:
    return {chi: f"chi={chi} (N={chi * config.expansion}, k={chi})" for chi in granularities}


def run_paper_cells(config: SweepConfig, rows: list[dict]) -> dict:
    """Run the paper sweep's cells not in ``rows`` (seed, then granularity, then keep ratio), writing the CSV after
    each and the plot after each seed; returns what :func:`sparsity_sweep` does."""
    seeds, chis, ratios = config.seed_list, config.granularity_grid, config.keep_ratio_grid
    out = Path(config.output_dir)
    files = {name: str(out / name) for name in (CSV_FILE, KEEP_RATIO_PLOT, CONFIG_FILE)}
    print(f"Output folder: {out.resolve()}\n"
          f"  {CSV_FILE:<28} one row per (seed, granularity, keep ratio), written as each finishes\n"
          f"  {KEEP_RATIO_PLOT:<28} linear-probe test accuracy against keep ratio, a line per granularity "
          "(after each seed)\n"
          f"  {CONFIG_FILE:<28} the config; the same command resumes a killed sweep\n"
          f"  {STATE_FOLDER + '/':<28} each (seed, granularity)'s adapter after stages 1 and 2 (for resuming)",
          flush=True)
    cells = [(seed, chi, ratio) for seed in seeds for chi in chis for ratio in ratios]
    order = {cell: i for i, cell in enumerate(cells)}
    done = finished_cells(rows, order, PAPER_CELL, out)
    plotted = False
    with tqdm(total=len(order), initial=len(done), desc="sweep", unit="cell") as progress:
        for seed in seeds:
            data = None
            for chi in chis:
                todo = [ratio for ratio in ratios if (seed, chi, ratio) not in done]
                if not todo:
                    continue
                progress.set_postfix_str(f"seed {seed}, chi {chi}: stages 1 and 2")
                data = load_feature_data(config, seed) if data is None else data
                run = PaperRun(config, data, seed, chi, out / STATE_FOLDER)
                for ratio in todo:
                    progress.set_postfix_str(f"seed {seed}, chi {chi}, keep ratio {ratio:g}")
                    row = run.cell(ratio)
                    rows = sorted([*rows, row], key=lambda r: order[cell_of(r, PAPER_CELL)])
                    write_rows(out / CSV_FILE, rows, PAPER_CSV_FIELDS)
                    progress.update(1)
                    progress.write(f"seed {seed}, chi {chi}, keep ratio {ratio:g}: pairs kept {row['kept_pairs']:.3f}, "
                                   f"test accuracy {row['test_accuracy']:.4f} (stage 1 only, p = 1: "
                                   f"{row['specialization_accuracy']:.4f})")
            if data is not None:
                write_paper_plot(config, rows)
                plotted = True
    if not plotted:  # every cell was in the CSV already
        write_paper_plot(config, rows)
    summary, specialization = summarize_paper(rows)
    return {"rows": rows, "summary": summary, "specialization": specialization, "files": files}


def write_paper_plot(config: SweepConfig, rows: list[dict]) -> None:
    """Accuracy against keep ratio over the rows so far: a line per granularity, the stage-1-only probe at p = 1."""
    if not rows:
        return
    summary, specialization = summarize_paper(rows)
    seeds = len({row["seed"] for row in rows})
    plot_keep_ratio_curves(summary, Path(config.output_dir) / KEEP_RATIO_PLOT,
                           f"S3 (paper design) on {config.dataset}: linear probe, mean ± std over {seeds} seed(s)",
                           by="granularity", labels=granularity_labels(config, specialization),
                           reference=specialization, reference_label="stage 1 only (p = 1)")


def summary_table(config: SweepConfig, result: dict) -> str:
    """The markdown table the recipe prints at the end of a sweep."""
    if config.design == "paper":
        chis = list(result["specialization"])
        return "\n".join(keep_ratio_table(result["summary"], chis, by="granularity",
                                           labels=granularity_labels(config, chis),
                                           extra_rows=[("stage 1 only (p = 1)", result["specialization"])]))
    lines = ["| sparsity | pruned | test accuracy (mean ± std) | seeds |", "| --- | --- | --- | --- |"]
    lines += [f"| {row['sparsity']:.3f} | {row['pruned']} | {row['mean']:.4f} ± {row['std']:.4f} | {row['seeds']} |"
              for row in result["summary"]]
    return "\n".join(lines)


def check_paper_grid(config: SweepConfig) -> None:
    """Fail before training on a paper-sweep field outside what it accepts."""
    def bad(name: str, expected: str):
        return ConfigError(name, f"--{name} must be {expected}, got {getattr(config, name)!r}.")

    grids = {}
    for name, grid in (("granularities", "granularity_grid"), ("keep_ratios", "keep_ratio_grid")):
        try:
            grids[name] = getattr(config, grid)
        except ValueError:
            raise bad(name, "comma-separated numbers, e.g. --granularities 1,2,4 --keep_ratios 0.1,0.5,1.0") from None
    chis, ratios = grids["granularities"], grids["keep_ratios"]
    if not chis or len(set(chis)) != len(chis) or min(chis) < 1:
        raise bad("granularities", "distinct positive integers (chi, experts per token), e.g. 1,2,4")
    if not ratios or len(set(ratios)) != len(ratios) or not all(0 < r <= 1 for r in ratios):
        raise bad("keep_ratios", "distinct numbers in (0, 1], e.g. 0.1,0.2,0.5,1.0")
    for name in ("stage1_epochs", "stage2_epochs"):
        if getattr(config, name) < 0:
            raise bad(name, "an integer >= 0")
    for name in ("eval_batch_size", "expansion", "num_moe_layers"):
        if getattr(config, name) < 1:
            raise bad(name, "an integer >= 1")
    heads = S3Config.__dataclass_fields__["num_heads"].default
    if config.latent_size % heads:
        raise bad("latent_size", f"a multiple of {heads} in the paper design (its MoE layers' attention heads), "
                                "e.g. 32")
    for chi in chis:  # the adapter's own checks (positive chi and rho, latent_size a multiple of the heads...)
        paper_s3_config(config, chi)


def compared_config(config: SweepConfig) -> dict:
    """The fields that decide a sweep's results, as stored in ``config.json``: not the other design's fields, and a
    concepts sweep leaves out ``design`` (its config.json is as before the paper design existed)."""
    other = PAPER_FIELDS if config.design == "concepts" else CONCEPT_FIELDS
    skipped = {*NOT_COMPARED, *other, *(("design",) if config.design == "concepts" else ())}
    return json.loads(json.dumps({k: v for k, v in asdict(config).items() if k not in skipped}))


def read_rows(path: Path, fields: tuple[str, ...] = CSV_FIELDS, types: dict | None = None) -> list[dict]:
    """The rows of a ``sweep.csv`` with their types (floats read back exactly as written)."""
    types = types or CSV_TYPES
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != fields:
            raise CorruptFileError(path, f"columns {reader.fieldnames} are not the sweep's {list(fields)}; "
                                         "pass --overwrite_output_dir to start over.")
        try:
            return [{key: types[key](row[key]) for key in fields} for row in reader]
        except (TypeError, ValueError) as error:
            raise CorruptFileError(path, f"a row does not parse ({error}); pass --overwrite_output_dir to start "
                                         "over.") from None


def write_rows(path: Path, rows: list[dict], fields: tuple[str, ...] = CSV_FIELDS) -> None:
    """Write the whole CSV again, atomically (a reader or a kill never leaves half a file)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_file_atomic(path, text.getvalue())


def prepare_output(config: SweepConfig) -> list[dict]:
    """Make ``config.output_dir`` ready and return the rows a previous run of the same config left there.

    A folder holding a sweep of another config (or files of a sweep without ``config.json``) is refused unless
    ``overwrite_output_dir`` is set, which removes the sweep's files first.
    """
    out = Path(config.output_dir)
    for folder in (out, out / STATE_FOLDER):  # leftovers of writers that were killed
        recover_directory(folder)
    found = [name for name in OUTPUTS if (out / name).exists()]
    if found and config.overwrite_output_dir:
        for name in found:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        print(f"--overwrite_output_dir: removed the previous sweep's {', '.join(found)} from {out}.")
        found = []
    rows = []
    if found:
        fix = "pass --overwrite_output_dir to start over, or choose another --output_dir."
        if CONFIG_FILE not in found:
            raise ConfigError("output_dir", f"--output_dir {out} holds sweep files ({', '.join(found)}) without the "
                                            f"{CONFIG_FILE} that says which config wrote them; {fix}")
        try:
            saved = json.loads((out / CONFIG_FILE).read_text())
        except json.JSONDecodeError as error:
            raise CorruptFileError(out / CONFIG_FILE, f"not JSON ({error}); {fix}") from None
        saved = current_names(saved, SweepConfig.renamed_fields, str(out / CONFIG_FILE))
        current = compared_config(config)
        designs = (saved.get("design", "concepts"), config.design)
        changed = [f"design: {designs[0]!r} there, {designs[1]!r} now"] if designs[0] != designs[1] else \
            [f"{key}: {saved.get(key)!r} there, {current.get(key)!r} now"
             for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
        if changed:
            raise ConfigError("output_dir", f"--output_dir {out} holds a sweep of a different config "
                                            f"({'; '.join(changed)}); run the same config to resume it, or {fix}")
        if (out / CSV_FILE).exists():
            rows = read_rows(out / CSV_FILE, *((PAPER_CSV_FIELDS, PAPER_CSV_TYPES) if config.design == "paper" else ()))
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / CONFIG_FILE, json.dumps(compared_config(config), indent=2) + "\n")
    return rows


def sparsity_sweep(config: SweepConfig) -> dict:
    """Run the whole sweep of ``config.design``, or what is left of it; returns ``{"rows", "summary", "files"}``
    (paper design: also ``"specialization"``, ``{chi: (mean, std)}`` of the stage-1-only probe).

    Into ``config.output_dir`` (printed at the start): ``config.json`` first, ``sweep.csv`` after every cell, the
    trained adapters under ``state/`` (per seed; paper: per seed and granularity) and the plots as it goes (concepts:
    ``accuracy_vs_sparsity.png`` and ``expert_usage.png``; paper: ``accuracy_vs_keep_ratio.png``), all atomically.
    Cells already in ``sweep.csv`` from a killed run of the same config are skipped.
    """
    from ..moe.utility import experts_to_prune

    if config.design == "paper":
        check_paper_grid(config)
    for sparsity in config.sparsity_grid if config.design == "concepts" else ():  # fail before training on a bad grid
        experts_to_prune(sparsity, config.num_experts)
    if config.num_threads < 1:
        raise ConfigError("num_threads", f"--num_threads must be >= 1, got {config.num_threads}.")
    rows = prepare_output(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return (run_paper_cells if config.design == "paper" else run_cells)(config, rows)
    finally:
        torch.set_num_threads(threads)


def run_cells(config: SweepConfig, rows: list[dict]) -> dict:
    """Run the cells not in ``rows`` (seed by seed, in grid order), writing the CSV after each and the plots after
    each seed; returns what :func:`sparsity_sweep` does."""
    grid, seeds = config.sparsity_grid, config.seed_list
    out = Path(config.output_dir)
    files = {name: str(out / name) for name in (CSV_FILE, CURVE_PLOT, USAGE_PLOT, CONFIG_FILE)}
    where = out.resolve()
    print(f"Output folder: {where}\n"
          f"  {CSV_FILE:<24} one row per (seed, sparsity), written as each finishes\n"
          f"  {CURVE_PLOT:<24} test accuracy against sparsity (after each seed)\n"
          f"  {USAGE_PLOT:<24} expert usage per class, seed {seeds[0]} (after each seed)\n"
          f"  {CONFIG_FILE:<24} the config; the same command resumes a killed sweep\n"
          f"  {STATE_FOLDER + '/':<24} each seed's trained adapter (for resuming)", flush=True)
    order = {(seed, sparsity): i for i, (seed, sparsity) in enumerate((s, p) for s in seeds for p in grid)}
    done = finished_cells(rows, order, CONCEPTS_CELL, out)
    routing = None
    with tqdm(total=len(order), initial=len(done), desc="sweep", unit="cell") as progress:
        for seed in seeds:
            todo = [(level, s) for level, s in enumerate(grid) if (seed, s) not in done]
            if not todo and routing is not None:
                continue
            progress.set_postfix_str(f"seed {seed}")
            run = SeedRun(config, seed, out / STATE_FOLDER)
            if routing is None:
                routing = run.routing()
            for level, sparsity in todo:
                progress.set_postfix_str(f"seed {seed}, sparsity {sparsity:g}")
                row = run.cell(level, sparsity)
                rows = sorted([*rows, row], key=lambda r: order[cell_of(r, CONCEPTS_CELL)])
                write_rows(out / CSV_FILE, rows)
                progress.update(1)
                progress.write(f"seed {seed}, sparsity {sparsity:g}: pruned {row['pruned']}, validation accuracy "
                               f"{row['validation_accuracy']:.4f}, test accuracy {row['test_accuracy']:.4f}")
            write_plots(config, rows, routing)
    write_plots(config, rows, routing)
    return {"rows": rows, "summary": summarize(rows), "files": files}


def write_plots(config: SweepConfig, rows: list[dict], routing: dict | None) -> None:
    """The accuracy curve over the rows so far and the first seed's expert usage per class."""
    out = Path(config.output_dir)
    if rows:
        plot_sparsity_curve(summarize(rows), out / CURVE_PLOT,
                            f"S3 on {config.dataset}: mean ± std over seeds")
    if routing is not None:
        plot_class_usage(routing["routing_weights"].numpy(), routing["labels"].numpy(), routing["label_names"],
                         out / USAGE_PLOT, title=f"S3 concept (expert) usage per class, test split, seed "
                                                 f"{config.seed_list[0]}")
