"""The S3 sparsity sweep on two-modality feature data: train once, then for each sparsity prune, fine-tune, evaluate.

Per seed: a :class:`~mmexperts.FeatureEncoderForClassification` with frozen towers gets an S3 adapter, which trains on
the task (after an optional self-supervised Specialization stage). For every sparsity of the grid the trained adapter
is restored, pruned on the validation split (utility criterion and schedule as configured), its router and heads are
fine-tuned briefly (the unpruned level too), and validation and test accuracy are recorded. Results: a CSV, a PNG of
accuracy against sparsity (mean and std over seeds) and a PNG of expert usage per class.

The sweep writes as it goes and resumes: ``config.json`` first, then ``sweep.csv`` again after every (seed, sparsity)
cell, the trained adapter of each seed under ``state/`` and the plots after each seed, every file atomically. Each
cell draws its randomness from its own seed (seed, level), so a sweep that is killed and started again with the same
config skips the cells already in the CSV and ends with the same CSV as one that ran straight through.

The default factor data puts a train-only spurious correlation into modality b's nuisance factors (validation and test
independent). Experts that specialise on modality b's tokens then carry a shortcut that fails on held-out data; the
leave-one-out validation-loss utility ranks them lowest, so moderate pruning raises test accuracy, and pruning further
removes label-relevant experts and lowers it (the reverse U of S3's sparsity finding).
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

import numpy as np
import peft
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import recover_directory, write_file_atomic
from ..errors import ConfigError, CorruptFileError
from ..metrics import compute_metrics
from ..modeling import FeatureEncoderConfig, FeatureEncoderForClassification
from ..plots import plot_class_usage, plot_sparsity_curve
from ..s3.config import S3Config

FEATURE_COLUMNS = {"modality_a": "features_a", "modality_b": "features_b", "label": "labels", "task_id": "task_ids"}
CSV_FIELDS = ("seed", "sparsity", "pruned", "active_experts", "validation_accuracy", "test_accuracy", "test_loss")
CSV_TYPES = {"seed": int, "sparsity": float, "pruned": int, "active_experts": str, "validation_accuracy": float,
             "test_accuracy": float, "test_loss": float}
CSV_FILE, CONFIG_FILE, STATE_FOLDER = "sweep.csv", "config.json", "state"
CURVE_PLOT, USAGE_PLOT = "accuracy_vs_sparsity.png", "expert_usage.png"
OUTPUTS = (CSV_FILE, CONFIG_FILE, CURVE_PLOT, USAGE_PLOT, STATE_FOLDER, "config.txt")
NOT_COMPARED = ("output_dir", "overwrite_output_dir")  # where the sweep is written does not change its results


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
    num_threads: int = field(default=1, metadata={
        "help": "Torch CPU threads while the sweep runs. Its models are tiny, so one thread is fastest; more threads "
                "gain nothing and, on a machine whose cores are busy, make every step many times slower."})
    output_dir: str = field(default="outputs/s3-sweep", metadata={
        "help": "Where the CSV, its config.json, the plots and state/ go. A folder holding an unfinished sweep of the "
                "same config is resumed (finished cells are skipped); one of another config is refused."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an output_dir that holds a sweep: its sweep.csv, config.json, plots and state/ are "
                "removed first."})

    @property
    def sparsity_grid(self) -> list[float]:
        return [float(s) for s in str(self.sparsities).split(",") if s.strip()]

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in str(self.seeds).split(",") if s.strip()]


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
    s3 = S3Config(design="concepts", num_experts=config.num_experts, latent_dim=config.latent_dim, top_k=config.top_k,
                  head_input=config.head_input, assignment_temperature=config.assignment_temperature,
                  sharpness_loss_weight=config.sharpness_loss_weight, ssl_loss_weight=config.ssl_loss_weight)
    with warnings.catch_warnings():  # PEFT reads the deprecated `is_gradient_checkpointing`; only that is hidden
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
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
        labels: bool = True, description: str | None = None) -> None:
    """AdamW over the trainable parameters; ``labels=False`` drops labels (the self-supervised stage).

    With a ``description``, a progress bar counts the steps (it disappears when done).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    model.train()
    total = epochs * len(loader) if hasattr(loader, "__len__") else None
    shown = {} if description else {"disable": True}  # an unset `disable` leaves TQDM_DISABLE in charge
    with tqdm(total=total, desc=description, unit="step", leave=False, **shown) as progress:
        for _ in range(epochs):
            for batch in loader:
                if not labels:
                    batch = {k: v for k, v in batch.items() if k != "labels"}
                loss = model(**batch).loss
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                progress.update(1)
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
    mask = tuner.prune(sparsity, validation, criterion=config.criterion, schedule=config.schedule)
    if config.finetune_epochs:
        with only_trainable(model, tuner.router_and_head_parameters()):
            fit(model, train, config.finetune_epochs, config.learning_rate, config.weight_decay,
                description=description)
    return mask


def cell_seed(seed: int, level: int) -> int:
    """The seed of one (seed, sparsity level) cell: its randomness does not depend on which cells ran before it."""
    return int(np.random.SeedSequence([seed, level]).generate_state(1)[0])


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


def compared_config(config: SweepConfig) -> dict:
    """The fields that decide a sweep's results, as stored in ``config.json``."""
    return json.loads(json.dumps({k: v for k, v in asdict(config).items() if k not in NOT_COMPARED}))


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``sweep.csv`` with their types (floats read back exactly as written)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:
            raise CorruptFileError(path, f"columns {reader.fieldnames} are not the sweep's {list(CSV_FIELDS)}; "
                                         "pass --overwrite_output_dir to start over.")
        try:
            return [{key: CSV_TYPES[key](row[key]) for key in CSV_FIELDS} for row in reader]
        except (TypeError, ValueError) as error:
            raise CorruptFileError(path, f"a row does not parse ({error}); pass --overwrite_output_dir to start "
                                         "over.") from None


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write the whole CSV again, atomically (a reader or a kill never leaves half a file)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, lineterminator="\n")
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
        current = compared_config(config)
        changed = [f"{key}: {saved.get(key)!r} there, {current.get(key)!r} now"
                   for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
        if changed:
            raise ConfigError("output_dir", f"--output_dir {out} holds a sweep of a different config "
                                            f"({'; '.join(changed)}); run the same config to resume it, or {fix}")
        if (out / CSV_FILE).exists():
            rows = read_rows(out / CSV_FILE)
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / CONFIG_FILE, json.dumps(compared_config(config), indent=2) + "\n")
    return rows


def sparsity_sweep(config: SweepConfig) -> dict:
    """Run the whole sweep, or what is left of it; returns ``{"rows", "summary", "files"}``.

    Into ``config.output_dir`` (printed at the start): ``config.json`` first, ``sweep.csv`` after every cell, each
    seed's trained adapter under ``state/`` and ``accuracy_vs_sparsity.png`` and ``expert_usage.png`` after each seed,
    all atomically. Cells already in ``sweep.csv`` from a killed run of the same config are skipped.
    """
    from ..moe.utility import experts_to_prune

    for sparsity in config.sparsity_grid:  # fail before training on a bad grid
        experts_to_prune(sparsity, config.num_experts)
    if config.num_threads < 1:
        raise ConfigError("num_threads", f"--num_threads must be >= 1, got {config.num_threads}.")
    rows = prepare_output(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return run_cells(config, rows)
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
    done = {(row["seed"], row["sparsity"]) for row in rows}
    order = {(seed, sparsity): i for i, (seed, sparsity) in enumerate((s, p) for s in seeds for p in grid)}
    if done - set(order):
        raise CorruptFileError(out / CSV_FILE, f"rows {sorted(done - set(order))} are not cells of this sweep's "
                                               "grid; pass --overwrite_output_dir to start over.")
    if done:
        print(f"Resuming: {len(done)} of {len(order)} cells are already in {out / CSV_FILE}.", flush=True)
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
                rows = sorted([*rows, row], key=lambda r: order[(r["seed"], r["sparsity"])])
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
