"""The S3 sparsity sweep on two-modality feature data: train once, then for each sparsity prune, fine-tune, evaluate.

Per seed: a :class:`~mmexperts.FeatureEncoderForClassification` with frozen towers gets an S3 adapter, which trains on
the task (after an optional self-supervised Specialization stage). For every sparsity of the grid the trained adapter
is restored, pruned on the validation split (utility criterion and schedule as configured), its router and heads are
fine-tuned briefly (the unpruned level too), and validation and test accuracy are recorded. Results: a CSV, a PNG of
accuracy against sparsity (mean and std over seeds) and a PNG of expert usage per class.

The default factor data puts a train-only spurious correlation into modality b's nuisance factors (validation and test
independent). Experts that specialise on modality b's tokens then carry a shortcut that fails on held-out data; the
leave-one-out validation-loss utility ranks them lowest, so moderate pruning raises test accuracy, and pruning further
removes label-relevant experts and lowers it (the reverse U of S3's sparsity finding).
"""

from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import peft
import torch
from torch.utils.data import DataLoader

from ..atomic import atomic_directory
from ..modeling import FeatureEncoderConfig, FeatureEncoderForClassification
from ..plots import plot_routing
from ..training.loop import compute_metrics
from .config import S3Config

FEATURE_COLUMNS = {"modality_a": "features_a", "modality_b": "features_b", "label": "labels", "task_id": "task_ids"}
CSV_FIELDS = ("seed", "sparsity", "pruned", "active_experts", "validation_accuracy", "test_accuracy", "test_loss")


@dataclass
class SweepConfig:
    """Everything one sweep needs; every field is also a ``recipes/sweep_s3.py`` option."""

    dataset: str = field(default="factors", metadata={
        "help": "'factors' (synthetic, offline) or 'multibench:<name>' (mosi, mosei, sarcasm, humor, mimic) with "
                "data_dir."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the MultiBench pickles."})
    num_train: int = field(default=600, metadata={"help": "Factor data: training examples."})
    num_eval: int = field(default=400, metadata={"help": "Factor data: validation and test examples (each)."})
    label_from: str = field(default="shared,unique_a", metadata={
        "help": "Factor data: comma-separated factor groups the label depends on; the others are irrelevant."})
    spurious_strength: float = field(default=0.9, metadata={
        "help": "Factor data: how strongly the nuisance (noise) factors agree with the label in train only, in "
                "[0, 1]; validation and test stay independent (a train/test shift that pruning can undo)."})
    spurious_modalities: str = field(default="b", metadata={
        "help": "Factor data: whose noise factors are spurious: 'a', 'b' or 'ab'."})
    sparsities: str = field(default="0,0.125,0.25,0.375,0.5,0.625,0.75,0.875", metadata={
        "help": "Comma-separated fractions of experts to prune, each in [0, 1)."})
    seeds: str = field(default="0,1,2", metadata={"help": "Comma-separated seeds."})
    num_experts: int = field(default=8, metadata={"help": "Concept experts K."})
    latent_dim: int = field(default=32, metadata={"help": "Shared latent width d."})
    top_k: int | None = field(default=None, metadata={"help": "Router top-k (None: soft gating)."})
    head_input: str = field(default="concat", metadata={"help": "What the heads read: 'concat' or 'sum'."})
    assignment_temperature: float = field(default=0.5, metadata={
        "help": "Temperature of the token-to-concept assignment (lower: each token goes to fewer concepts)."})
    sharpness_loss_weight: float = field(default=0.01, metadata={"help": "Weight of the assignment-entropy loss."})
    ssl_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the per-concept InfoNCE in training."})
    ssl_epochs: int = field(default=0, metadata={"help": "Self-supervised Specialization epochs before training."})
    hidden_size: int = field(default=40, metadata={"help": "Width of the frozen feature towers."})
    num_hidden_layers: int = field(default=1, metadata={"help": "Blocks per frozen feature tower."})
    epochs: int = field(default=40, metadata={"help": "Supervised training epochs of the full adapter."})
    finetune_epochs: int = field(default=10, metadata={"help": "Router + head fine-tune epochs after pruning."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=64, metadata={"help": "Batch size."})
    criterion: str = field(default="loss", metadata={"help": "Utility: loss, gate_mass, usage or gate_output_norm."})
    schedule: str = field(default="progressive", metadata={"help": "Pruning schedule: one-shot or progressive."})
    output_dir: str = field(default="outputs/s3-sweep", metadata={"help": "Where the CSV and plots go."})

    @property
    def sparsity_grid(self) -> list[float]:
        return [float(s) for s in str(self.sparsities).split(",") if s.strip()]

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in str(self.seeds).split(",") if s.strip()]


def load_feature_data(config: SweepConfig, seed: int):
    """The sweep's ``DatasetDict`` (train/validation/test with modality_a, modality_b, label)."""
    if config.dataset == "factors":
        from ..data.factors import build_factor_dataset

        return build_factor_dataset(num_train=config.num_train, num_validation=config.num_eval,
                                    num_test=config.num_eval, label_from=tuple(config.label_from.split(",")),
                                    spurious_strength=config.spurious_strength,
                                    spurious_modalities=tuple(config.spurious_modalities), seed=seed)
    if config.dataset.startswith("multibench:"):
        from ..data.multibench import load_multibench

        if not config.data_dir:
            raise ValueError(f"dataset {config.dataset!r} needs --data_dir, the folder holding its pickle.")
        return load_multibench(config.dataset.split(":", 1)[1], config.data_dir)
    raise ValueError(f"dataset must be 'factors' or 'multibench:<name>', got {config.dataset!r}.")


def feature_loader(split, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of ``features_a``, ``features_b``, ``labels`` (and ``task_ids``) from a feature-data split."""
    columns = [c for c in FEATURE_COLUMNS if c in split.column_names]
    generator = torch.Generator().manual_seed(seed)

    def collate(rows):
        return {FEATURE_COLUMNS[c]: torch.stack([torch.as_tensor(r[c]) for r in rows]) for c in columns}

    return DataLoader(split.with_format("torch", columns=columns), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, collate_fn=collate)


def build_model(data, config: SweepConfig, seed: int) -> peft.PeftModel:
    """A frozen feature encoder sized for ``data`` with a fresh S3 adapter."""
    example = data["train"][0]
    num_labels = data["train"].features["label"].num_classes
    torch.manual_seed(seed)
    base = FeatureEncoderForClassification(FeatureEncoderConfig(
        feature_dim_a=len(example["modality_a"][0]), feature_dim_b=len(example["modality_b"][0]),
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers, num_labels=num_labels))
    s3 = S3Config(num_experts=config.num_experts, latent_dim=config.latent_dim, top_k=config.top_k,
                  head_input=config.head_input, assignment_temperature=config.assignment_temperature,
                  sharpness_loss_weight=config.sharpness_loss_weight, ssl_loss_weight=config.ssl_loss_weight)
    return peft.get_peft_model(base, s3)


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
        labels: bool = True) -> None:
    """AdamW over the trainable parameters; ``labels=False`` drops labels (the self-supervised stage)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            if not labels:
                batch = {k: v for k, v in batch.items() if k != "labels"}
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
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
                       config: SweepConfig) -> torch.Tensor:
    """Prune to ``sparsity`` by validation utility, then fine-tune the router and heads; returns the expert mask.

    The unpruned level gets the same fine-tune, so every level has had the same training.
    """
    tuner = model.base_model
    mask = tuner.prune(sparsity, validation, criterion=config.criterion, schedule=config.schedule)
    if config.finetune_epochs:
        with only_trainable(model, tuner.router_and_head_parameters()):
            fit(model, train, config.finetune_epochs, config.learning_rate, config.weight_decay)
    return mask


def run_seed(config: SweepConfig, seed: int) -> tuple[list[dict], dict]:
    """One seed of the sweep: rows of the CSV and the full model's routing statistics on the test split."""
    data = load_feature_data(config, seed)
    model = build_model(data, config, seed)
    train = feature_loader(data["train"], config.batch_size, shuffle=True, seed=seed)
    validation = list(feature_loader(data["validation"], 256))
    test = feature_loader(data["test"], 256)
    if config.ssl_epochs:
        fit(model, train, config.ssl_epochs, config.learning_rate, config.weight_decay, labels=False)
    fit(model, train, config.epochs, config.learning_rate, config.weight_decay)
    trained = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    routing = model.base_model.routing_statistics(test)
    routing["label_names"] = data["test"].features["label"].names
    rows = []
    for sparsity in config.sparsity_grid:
        peft.set_peft_model_state_dict(model, trained)
        mask = prune_and_finetune(model, sparsity, validation, train, config)
        scores = evaluate(model, test)
        rows.append({"seed": seed, "sparsity": sparsity, "pruned": int((~mask).sum()),
                     "active_experts": " ".join(map(str, mask.nonzero().flatten().tolist())),
                     "validation_accuracy": evaluate(model, validation)["accuracy"],
                     "test_accuracy": scores["accuracy"], "test_loss": scores["loss"]})
    return rows, routing


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std of test accuracy per sparsity over seeds."""
    table = []
    for sparsity in sorted({row["sparsity"] for row in rows}):
        values = np.array([row["test_accuracy"] for row in rows if row["sparsity"] == sparsity])
        pruned = next(row["pruned"] for row in rows if row["sparsity"] == sparsity)
        table.append({"sparsity": sparsity, "pruned": pruned, "mean": float(values.mean()),
                      "std": float(values.std()), "seeds": len(values)})
    return table


def plot_sparsity_curve(summary: list[dict], path: str | os.PathLike, title: str) -> str:
    """PNG of mean test accuracy (with std band) against sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([row["sparsity"] for row in summary])
    mean, std = np.array([row["mean"] for row in summary]), np.array([row["std"] for row in summary])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, mean, marker="o")
    ax.fill_between(x, mean - std, mean + std, alpha=0.25)
    ax.set_xlabel("sparsity (fraction of experts pruned)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def sparsity_sweep(config: SweepConfig) -> dict:
    """Run the whole sweep; writes ``sweep.csv``, ``accuracy_vs_sparsity.png`` and ``expert_usage.png`` atomically
    into ``config.output_dir`` and returns ``{"rows", "summary", "files"}``."""
    for sparsity in config.sparsity_grid:  # fail before training on a bad grid
        from ..moe.utility import experts_to_prune

        experts_to_prune(sparsity, config.num_experts)
    rows, routings = [], []
    for seed in config.seed_list:
        seed_rows, routing = run_seed(config, seed)
        rows += seed_rows
        routings.append(routing)
    summary = summarize(rows)
    with atomic_directory(config.output_dir) as folder:
        with open(folder / "sweep.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        plot_sparsity_curve(summary, folder / "accuracy_vs_sparsity.png", f"S3 on {config.dataset}")
        first = routings[0]
        plot_routing(first["routing_weights"][None].numpy(), first["labels"].numpy(), first["label_names"],
                     folder / "expert_usage.png", title=f"S3 expert usage per class (seed {config.seed_list[0]})")
        (folder / "config.txt").write_text("\n".join(f"{k}: {v}" for k, v in asdict(config).items()))
    files = {name: str(Path(config.output_dir) / name)
             for name in ("sweep.csv", "accuracy_vs_sparsity.png", "expert_usage.png")}
    return {"rows": rows, "summary": summary, "files": files}
