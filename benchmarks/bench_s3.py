"""Benchmark S3: (a) cost of the S3 computation against the number of pruned experts, (b) the sparsity sweep on the
synthetic factor data (accuracy against sparsity, mean over seeds).

    python benchmarks/bench_s3.py                 # both parts, ~10 min on a quiet 2-core machine
    python benchmarks/bench_s3.py --skip-sweep    # part (a) only, ~1 min
    python benchmarks/bench_s3.py --seeds 0,1,2,3,4 --epochs 40

(a) ``S3Core`` (K=8, d=256, expert hidden 1024) on 128 examples x 64 tokens, forward (eval, no_grad) and forward +
backward (train), with 0..7 experts pruned through the expert mask. Every pruning level runs once per round, in an
order that rotates each round; medians over rounds. The ideal is the fraction of active experts (the assignment over
all K keys and the heads stay, so the measured time falls a little less than that).
(b) ``mmexperts.training.sweep.sparsity_sweep`` with ``SweepConfig`` defaults
(see ``recipes/configs/s3_factors_sweep.yaml``:
modality b's nuisance factors are spuriously correlated with the label in train only, ``--spurious-strength 0`` turns
that off): per seed, train the adapter once, then for each sparsity restore it, prune progressively by leave-one-out
validation loss, fine-tune router and heads, and score the test split. Results: stdout,
``benchmarks/results/bench_s3.md`` and the sweep's CSV and plots in ``benchmarks/results/bench_s3_sweep/``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from mmexperts import S3Config
from mmexperts.s3 import S3Core
from mmexperts.training.sweep import SweepConfig, sparsity_sweep

from harness import environment, markdown_table, median_ratio, time_rounds

HERE = Path(__file__).resolve().parent


def run_core(core: S3Core, tokens: torch.Tensor, mask: torch.Tensor, expert_mask: torch.Tensor) -> None:
    """A forward (no_grad) in eval mode, a forward + backward in training mode."""
    if core.training:
        out = core(tokens, mask, expert_mask)
        (out.logits.pow(2).mean() + out.aux_loss).backward()
        core.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            core(tokens, mask, expert_mask)


def cost_table(rounds: int, num_experts: int = 8) -> list[str]:
    torch.manual_seed(0)
    config = S3Config(design="concepts", num_experts=num_experts, latent_size=256, expert_hidden_size=1024,
                      ssl_loss_weight=0.0, init_weights=False)  # 0.0: what an adapter with a head resolves None to
    core = S3Core(config, num_labels=2)
    tokens, mask = torch.randn(128, 64, 256), torch.ones(128, 64, dtype=torch.bool)
    levels = list(range(num_experts))
    calls = {p: partial(run_core, core, tokens, mask, torch.arange(num_experts) < num_experts - p) for p in levels}
    times = {}
    for mode in ("forward", "train"):
        core.train(mode == "train")
        times[mode] = time_rounds(calls, rounds, warmup=1)
    rows = []
    for p in levels:
        active = num_experts - p
        cells = [str(p), str(active), f"{active / num_experts:.3f}"]
        for mode in ("forward", "train"):
            cells += [f"{1000 * statistics.median(times[mode][p]):.1f}",
                      f"{median_ratio(times[mode][p], times[mode][0]):.3f}"]
        rows.append(cells)
    return markdown_table(["pruned", "active", "ideal (active/K)", "forward ms", "forward / unpruned", "train step ms",
                           "train / unpruned"], rows)


def paired_lines(rows: list[dict], peak: float) -> list[str]:
    """Per seed, test accuracy at the peak sparsity minus at the unpruned and at the highest sparsity (paired)."""
    by_seed = {}
    for row in rows:
        by_seed.setdefault(row["seed"], {})[row["sparsity"]] = row["test_accuracy"]
    lowest, highest = min(r["sparsity"] for r in rows), max(r["sparsity"] for r in rows)
    return [f"Per seed (paired), test accuracy at the peak sparsity {peak:.3f} minus the unpruned / the highest "
            "sparsity:", "",
            *markdown_table(["seed", "peak - unpruned", "peak - highest"],
                            [[str(seed), f"{accuracy[peak] - accuracy[lowest]:+.4f}",
                              f"{accuracy[peak] - accuracy[highest]:+.4f}"] for seed, accuracy in by_seed.items()])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=SweepConfig.epochs)
    parser.add_argument("--spurious-strength", type=float, default=SweepConfig.spurious_strength)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(HERE / "results" / "bench_s3.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["# S3 benchmark", "", f"Environment (at start): {environment()}.", "",
             f"## (a) S3 compute against pruned experts ({args.rounds} rounds, medians)", "",
             "S3Core, K=8, d=256, expert hidden 1024, 128 examples x 64 tokens, fp32.", "",
             *cost_table(args.rounds)]
    print("\n".join(lines))
    if not args.skip_sweep:
        # the benchmark writes its results afresh: the previous run's sweep folder is replaced, not resumed
        config = SweepConfig(seeds=args.seeds, epochs=args.epochs, spurious_strength=args.spurious_strength,
                             output_dir=str(Path(args.output).with_suffix("").as_posix() + "_sweep"),
                             overwrite_output_dir=True)
        start = time.perf_counter()
        result = sparsity_sweep(config)
        minutes = (time.perf_counter() - start) / 60
        best = max(result["summary"], key=lambda row: row["mean"])
        seeds = len(config.seed_list)
        sweep = ["", f"## (b) Sparsity sweep on synthetic factor data ({seeds} seeds, {minutes:.1f} min)",
                 "",
                 f"{config.num_train} training / {config.num_eval} validation / {config.num_eval} test examples, label "
                 f"from `{config.label_from}` (the other factor groups are label-irrelevant); spurious_strength="
                 f"{config.spurious_strength} on modality `{config.spurious_modalities}`'s noise factors (in train "
                 f"they agree with the label {50 * (1 + config.spurious_strength):.0f}% of the time; validation and "
                 f"test independent); K={config.num_experts}, "
                 f"d={config.latent_size}; {config.epochs} training epochs, pruning `{config.pruning_schedule}` by "
                 f"`{config.criterion}` utility on validation, {config.finetune_epochs} router + head fine-tune "
                 "epochs (every level, the unpruned one included).",
                 "",
                 *markdown_table(["sparsity", "pruned", "test accuracy (mean ± std over seeds)"],
                                 [[f"{row['sparsity']:.3f}", str(row["pruned"]),
                                   f"{row['mean']:.4f} ± {row['std']:.4f}"] for row in result["summary"]]),
                 "",
                 f"Peak at sparsity {best['sparsity']:.3f} ({best['mean']:.4f}); unpruned "
                 f"{result['summary'][0]['mean']:.4f}; highest sparsity {result['summary'][-1]['mean']:.4f}. "
                 f"Reverse U (an intermediate sparsity above both ends): "
                 f"{'yes' if result['summary'][0]['mean'] < best['mean'] > result['summary'][-1]['mean'] else 'no'}.",
                 "", *paired_lines(result["rows"], best["sparsity"]),
                 "", "Files: " + ", ".join(f"`{Path(p).relative_to(HERE.parent)}`" for p in result["files"].values())]
        print("\n".join(sweep))
        lines += sweep
    lines += ["", f"Load average at end {os.getloadavg()[0]:.2f}."]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
