"""Alt-MoE on real pretrained towers: caption <-> image retrieval on Fashion-MNIST (fashion:retrieval) over the frozen
CLIP ViT-B/16 image tower (all 12 blocks, 28 px images resized to 64 px, position embeddings interpolated) and
all-MiniLM-L6-v2, trained by the recipe's engine from cached tower features.

    python benchmarks/bench_altmoe_real.py [--train-size 2000] [--eval-size 500] [--epochs 3] [--seeds 0 1 2]

Grid: schedule (alternating: one direction per optimiser step, as the paper; joint: both directions' losses summed
each step, same number of steps; joint-half: joint with half the steps, i.e. the same number of per-direction updates
as alternating, run for ``--half-connectors`` only) x connector (MoE with top-k of 8 experts, k in {1, 2, 4}; MLP: one
expert with 8x the inner width, the same parameter count up to the gate) x seeds. Every caption of every training
image is used (5 per image); evaluation is the recipe's: held-out images, caption 0 of each, Recall@1/5/10 both ways.
Images of one class and look share captions, so no model can tell them apart from the text: the table gives that
ceiling (R@K <= mean over images of min(1, K / images sharing its caption)).
Writes ``benchmarks/results/bench_altmoe_real.{csv,md,png}``; the CSV is appended run by run, and runs already in it
are skipped, so a killed benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mmexperts.data.loading import load_task  # noqa: E402
from mmexperts.training import TrainConfig, Trainer  # noqa: E402

from harness import environment, markdown_table  # noqa: E402

HERE = Path(__file__).resolve().parent
WIDTH, EXPERTS = 256, 8
CONNECTORS = {"MoE k=1": dict(num_experts=EXPERTS, top_k=1), "MoE k=2": dict(num_experts=EXPERTS, top_k=2),
              "MoE k=4": dict(num_experts=EXPERTS, top_k=4),
              "MLP": dict(num_experts=1, top_k=1, expert_hidden_size=EXPERTS * WIDTH)}
SCHEDULES = ("alternating", "joint", "joint-half")
CAPTIONS = 5  # per fashion:retrieval image
METRICS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
FIELDS = ["schedule", "connector", "seed", *METRICS, "rsum", "train_s", "params"]


def recall_ceiling(eval_split, ks=(1, 5, 10)) -> dict[int, float]:
    """Upper bound of Recall@K (percent) when images sharing caption 0 are indistinguishable from their caption."""
    firsts = [captions[0] for captions in eval_split["captions"]]
    counts = Counter(firsts)
    return {k: 100 * statistics.mean(min(1.0, k / counts[c]) for c in firsts) for k in ks}


def run_one(args, schedule: str, connector: str, seed: int, folder: Path) -> dict:
    steps = (CAPTIONS * args.train_size // 64) * args.epochs
    config = TrainConfig(max_steps=steps // 2 if schedule == "joint-half" else steps,
                         method="altmoe", dataset="fashion:retrieval", vision_model="real", text_model="real",
                         vision_image_size=64, train_size=args.train_size, eval_size=args.eval_size, seed=seed,
                         method_config={**CONNECTORS[connector], "hidden_size": WIDTH, "dropout": 0.1,
                                        "temperature": 0.03, "alpha": 0.5,
                                        "direction_schedule": "joint" if schedule == "joint-half" else schedule},
                         output_dir=str(folder), overwrite_output_dir=True, feature_cache_dir=args.cache_dir,
                         batch_size=64, eval_batch_size=250, num_epochs=args.epochs, learning_rate=args.lr,
                         weight_decay=5e-3, warmup_steps=50, eval_steps=10**9, save_steps=10**9)
    trainer = Trainer(config)
    trainer.setup()
    began = time.perf_counter()
    results = trainer.train()
    seconds = time.perf_counter() - began
    params, _ = trainer.accelerator.unwrap_model(trainer.model).get_nb_trainable_parameters()
    return {"schedule": schedule, "connector": connector, "seed": seed, "train_s": round(seconds, 1),
            "params": params, "rsum": results["eval_rsum"], **{m: results[f"eval_{m}"] for m in METRICS}}


def summarise(rows: list[dict]) -> dict:
    cells = {}
    for row in rows:
        cells.setdefault((row["schedule"], row["connector"]), []).append(row)
    summary = {}
    for key, runs in cells.items():
        values = {m: [float(r[m]) for r in runs] for m in [*METRICS, "rsum", "train_s"]}
        summary[key] = {m: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for m, v in values.items()}
        summary[key]["n"], summary[key]["params"] = len(runs), int(runs[0]["params"])
    return summary


def render(summary: dict, ceiling: dict, args, elapsed: float) -> str:
    command = (f"python benchmarks/bench_altmoe_real.py --train-size {args.train_size} --eval-size {args.eval_size} "
               f"--epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))}")
    summary = dict(sorted(summary.items(), key=lambda item: (SCHEDULES.index(item[0][0]),
                                                             list(CONNECTORS).index(item[0][1]))))
    lines = ["# Alt-MoE on real towers: Fashion-MNIST caption <-> image retrieval", "", f"Command: `{command}`", "",
             f"Frozen CLIP ViT-B/16 image tower (12 blocks, 64 px) + all-MiniLM-L6-v2; {args.train_size} training "
             f"images x 5 captions, {args.epochs} epochs, batch 64, AdamW lr {args.lr}, width {WIDTH}, tau 0.03, "
             f"alpha 0.5; trained from cached tower features. Evaluation: {args.eval_size} held-out images, caption 0 "
             "each. Recall in percent, mean +- std over seeds; training time = the recipe's training loop "
             "(features cached beforehand).", ""]
    rows = [[schedule, connector, f"{cell['params']:,}", *(f"{cell[m][0]:.1f} +- {cell[m][1]:.1f}"
                                                           for m in [*METRICS, "rsum"]), f"{cell['train_s'][0]:.0f}"]
            for (schedule, connector), cell in summary.items()]
    bound = [f"{ceiling[k]:.1f}" for k in (1, 5, 10)]
    rows.append(["ceiling", "(captions shared by images)", "", *bound, *bound, f"{2 * sum(ceiling.values()):.1f}", ""])
    lines += markdown_table(["schedule", "connector", "params", "I->T R@1", "R@5", "R@10", "T->I R@1", "R@5", "R@10",
                             "RSUM", "train s"], rows, right=range(2, 11))
    lines += ["", f"Environment: {environment(args.threads)}, busy shared cores; total {elapsed / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot(summary: dict, ceiling: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    connectors = list(CONNECTORS)
    for axis, direction in zip(axes, ("i2t", "t2i")):
        for offset, schedule, colour in ((-0.27, "alternating", "tab:blue"), (0.0, "joint", "tab:orange"),
                                         (0.27, "joint-half", "tab:green")):
            cells = [summary.get((schedule, c)) for c in connectors]
            xs = [i + offset for i, cell in enumerate(cells) if cell]
            if not xs:
                continue
            axis.bar(xs, [cell[f"{direction}_r1"][0] for cell in cells if cell], width=0.27, label=schedule,
                     color=colour,
                     yerr=[cell[f"{direction}_r1"][1] for cell in cells if cell], capsize=3)
        axis.axhline(ceiling[1], color="black", linestyle="--", linewidth=1, label="ceiling")
        axis.set_xticks(range(len(connectors)), connectors)
        axis.set_title(f"{'image -> text' if direction == 'i2t' else 'text -> image'} Recall@1")
    axes[0].set_ylabel("Recall@1 (%)")
    axes[1].legend()
    figure.suptitle("Alt-MoE on Fashion-MNIST, frozen CLIP ViT-B/16 + MiniLM-L6 (mean +- std over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--connectors", nargs="+", default=list(CONNECTORS), choices=list(CONNECTORS))
    parser.add_argument("--half-connectors", nargs="*", default=["MoE k=2"], choices=list(CONNECTORS),
                        help="Connectors that also run joint-half.")
    parser.add_argument("--cache-dir", default=None, help="Cached tower features (default: the recipe's).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "bench_altmoe_real")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    csv_path = args.output.with_suffix(".csv")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    done = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    keys = {(r["schedule"], r["connector"], int(r["seed"])) for r in done}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for schedule in args.schedules:
                for connector in args.connectors:
                    if (schedule, connector, seed) in keys or \
                            schedule == "joint-half" and connector not in args.half_connectors:
                        continue
                    row = run_one(args, schedule, connector, seed, Path(scratch) / "run")
                    print(row, flush=True)
                    with csv_path.open("a", newline="") as handle:
                        writer = csv.DictWriter(handle, FIELDS)
                        if handle.tell() == 0:
                            writer.writeheader()
                        writer.writerow(row)
                    done.append(row)
    rows = [r for r in done if r["schedule"] in args.schedules and r["connector"] in args.connectors
            and int(r["seed"]) in args.seeds]
    ceiling = recall_ceiling(load_task("fashion:retrieval", train_size=args.train_size, eval_size=args.eval_size,
                                       seed=args.seeds[0]).dataset["validation"])
    summary = summarise(rows)
    report = render(summary, ceiling, args, time.perf_counter() - began)
    print(report)
    args.output.with_suffix(".md").write_text(report)
    plot(summary, ceiling, args.output.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
