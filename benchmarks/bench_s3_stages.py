"""Benchmark S3's three stages (the paper design) on the synthetic factor data, scored by linear probing.

    python benchmarks/bench_s3_stages.py                  # 3 seeds, ~4.5 min on 2 busy cores (load 5)
    python benchmarks/bench_s3_stages.py --seeds 0,1,2,3,4 --stage1-epochs 40
    python benchmarks/bench_s3_stages.py --skip-concepts  # without the concept design's expert-pruning sweep

Per seed: ``load_task("synthetic:factors")`` (the label needs shared, unique and synergistic factors of both
modalities), a frozen random feature-encoder pair, and an S3 adapter (``S3Config.from_granularity``). The protocol is
``mmexperts.training.sweep.three_stages``: stage 1 (Specialization) trains everything of the adapter without labels;
stage 2 (Selection) trains only ``selection_parameters()`` (the routers) with SupCon + compactness; stage 3
(Sparsification) sets each keep ratio p in turn, extracts ``fused_embeds`` for train and test (eval batches of
``--eval-batch-size``: the top-p pairs are chosen per batch) and fits a linear probe
(``training.probes.fit_linear_probe``) on train, scored on test. The same keep-ratio sweep also runs on the model
after stage 1 alone, and the frozen towers' pooled features give a baseline. ``recipes/sweep_s3.py --config
recipes/configs/s3_paper_sweep.yaml`` runs the same protocol as a resumable recipe (stage 1 probed at p = 1 only).
Beside it, a small ``mmexperts.training.sweep.sparsity_sweep`` of the concepts design (its own data and protocol: a
train-only nuisance shortcut, supervised heads, gate-mass expert pruning, router + head fine-tune).
Results: stdout, ``benchmarks/results/bench_s3_stages.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch

from mmexperts import FeatureEncoderConfig, FeatureEncoderForClassification, S3Config
from mmexperts.data.loading import load_task
from mmexperts.plots import plot_keep_ratio_curves
from mmexperts.s3.protocol import keep_ratio_table, summarize_keep_ratios
from mmexperts.training.sweep import feature_loader, probe_accuracy, three_stages

from harness import markdown_table, run_footer
from s3_protocol import named_rows

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CSV_FIELDS = ("seed", "model", "keep_ratio", "kept_pairs", "test_accuracy")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--keep-ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--spurious-strength", type=float, default=0.0,
                        help="Factor data: train-only agreement of the nuisance factors with the label.")
    parser.add_argument("--granularities", default="2,8", help="chi values: experts per token (top_k).")
    parser.add_argument("--expansion", type=int, default=2, help="rho: num_experts = chi * rho.")
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--hidden-size", type=int, default=32, help="Width of the frozen feature towers.")
    parser.add_argument("--stage1-epochs", type=int, default=10)
    parser.add_argument("--stage2-epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--dispatch", default="dense", choices=("dense", "sparse"),
                        help="Expert dispatch; the same outputs, dense is faster at these tiny sizes.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (tiny models run fastest on one; more thrash on a shared machine).")
    parser.add_argument("--skip-concepts", action="store_true",
                        help="Skip the concept design's expert-pruning sweep (a small sparsity_sweep, ~1 min).")
    parser.add_argument("--output", default=str(RESULTS / "bench_s3_stages"), help="Path stem of the result files.")
    return parser.parse_args(argv)


def run_seed(args: argparse.Namespace, seed: int, ratios: list[float]) -> list[dict]:
    task = load_task("synthetic:factors", train_size=args.train_size, eval_size=args.eval_size, seed=seed,
                     spurious_strength=args.spurious_strength)
    data = task.dataset
    example = data["train"][0]
    train = feature_loader(data["train"], args.batch_size, shuffle=True, seed=seed)
    train_eval = feature_loader(data["train"], args.eval_batch_size)
    test = feature_loader(data["test"], args.eval_batch_size)
    rows = []
    for chi in [int(g) for g in args.granularities.split(",")]:
        torch.manual_seed(seed)
        base = FeatureEncoderForClassification(FeatureEncoderConfig(
            feature_size_a=len(example["modality_a"][0]), feature_size_b=len(example["modality_b"][0]),
            hidden_size=args.hidden_size, num_hidden_layers=1, num_labels=task.num_labels))
        config = S3Config.from_granularity(chi, args.expansion, latent_size=args.latent_size,
                                           num_layers=args.num_layers, dispatch=args.dispatch)
        model = peft.get_peft_model(base, config)
        if not rows:  # the same frozen towers for every chi (same seed)
            rows.append({"seed": seed, "model": "frozen towers", "keep_ratio": 1.0, "kept_pairs": 1.0,
                         "test_accuracy": probe_accuracy(model, train_eval, test, seed, adapter=False)[0]})
        stages = three_stages(model, train, train_eval, test, seed, ratios, args.stage1_epochs, args.stage2_epochs,
                              args.learning_rate)
        rows += named_rows(stages, seed, f"chi={chi}")
    return rows


def concept_sweep(args: argparse.Namespace) -> list[dict]:
    """The concept design's expert-pruning sweep (its own protocol: supervised heads, utility pruning, fine-tune)."""
    from mmexperts.training.sweep import SweepConfig, sparsity_sweep

    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):  # the sweep's own progress report
        config = SweepConfig(num_train=600, num_eval=400, seeds=args.seeds, sparsities="0,0.25,0.5,0.75",
                             epochs=15, finetune_epochs=3, criterion="gate_mass", pruning_schedule="one-shot",
                             output_dir=folder)
        return sparsity_sweep(config)["summary"]


def markdown(args, summary: list[dict], concepts: list[dict] | None, seconds: float, command: str) -> str:
    models = [m for m in dict.fromkeys(row["model"] for row in summary) if m != "frozen towers"]
    cell = {(row["model"], row["keep_ratio"]): row for row in summary}
    lines = [f"# S3 three stages on synthetic:factors (linear probe, {len(args.seeds.split(','))} seeds)", "",
             f"`{command}`", "",
             f"chi in {{{args.granularities}}}, rho={args.expansion} (N = chi * rho experts, top-chi), "
             f"d={args.latent_size}, {args.num_layers} MoE layer(s) per modality; stage 1 "
             f"{args.stage1_epochs} epochs, stage 2 {args.stage2_epochs} epochs (routers only); train "
             f"{args.train_size}, test {args.eval_size}; eval batches of {args.eval_batch_size}.", "",
             *keep_ratio_table(summary, models)]
    frozen = cell.get(("frozen towers", 1.0))
    if frozen:
        lines += ["", f"Frozen towers alone (no adapter): {frozen['mean']:.4f} ± {frozen['std']:.4f}."]
    if concepts:
        lines += ["", "Concepts design (`design=\"concepts\"`), `sparsity_sweep` with its own data and protocol: "
                  "SweepConfig's factor data (label from shared + unique_a; modality b's noise agrees with the label "
                  "in train only), 600 train / 400 test, supervised heads 15 epochs, one-shot gate-mass pruning, "
                  "3 fine-tune epochs; test accuracy:", "",
                  *markdown_table(["sparsity (experts pruned)", "test accuracy"],
                                  [[f"{row['sparsity']:.2f}", f"{row['mean']:.4f} ± {row['std']:.4f}"]
                                   for row in concepts])]
    lines += ["", run_footer(seconds, HERE)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/bench_s3_stages.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ratios = [float(r) for r in args.keep_ratios.split(",")]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows += run_seed(args, seed, ratios)
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    concepts = None if args.skip_concepts else concept_sweep(args)
    summary = summarize_keep_ratios(rows)
    stem = Path(args.output)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot_keep_ratio_curves(summary, stem.with_suffix(".png"), "S3 (paper design) on synthetic:factors",
                           labels={"frozen towers": "frozen towers (no adapter)"})
    text = markdown(args, summary, concepts, time.perf_counter() - start, command.strip())
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem.with_suffix('.csv')}, {stem.with_suffix('.png')}, {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
