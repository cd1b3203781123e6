"""S3 training from cached tower features vs running the frozen towers every step, through the recipe
(``mmexperts.training.Trainer``), one setting after the other in one process.

    python benchmarks/bench_s3_cache.py [--epochs 2] [--threads 1]

Two settings: the offline benchmark (synthetic:entailment, the tiny pretrained ViT + BERT) and real towers
(fashion:entailment, CLIP ViT-B/16's image tower, first 4 blocks at 64 px, + all-MiniLM-L6-v2). Each trains the same
S3 adapter (paper design, the recipe's defaults) with the same seed and data order twice: ``--cache_features`` (each
tower runs once per example, then training reads the stored token features and labels) and through the towers (their
dropout off, ``--no_frozen_dropout``, so both see the same features). Reported: seconds per epoch (the median time
between optimiser steps x steps per epoch), the one-off cache build (setup time with the cache minus without) and the
final accuracy of each.
Results go to stdout and ``benchmarks/results/bench_s3_cache.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmexperts.training import TrainConfig, Trainer

from harness import markdown_table, run_footer

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "synthetic (tiny ViT + BERT)": dict(dataset="synthetic:entailment", vision_model="synthetic",
                                        text_model="synthetic", train_size=2000, eval_size=500),
    "fashion (CLIP ViT-B/16, 4 blocks @ 64 px + MiniLM-L6)": dict(dataset="fashion:entailment", vision_model="real",
                                                                   text_model="real", vision_layers=4,
                                                                   vision_image_size=64, train_size=512,
                                                                   eval_size=128),
}


class StampedTrainer(Trainer):
    """Records when each optimiser step ends."""

    def setup(self) -> None:
        super().setup()
        self.stamps = []

    def _after_step(self, out) -> None:
        self.stamps.append(time.perf_counter())
        super()._after_step(out)


def run(name: str, cached: bool, args, scratch: Path) -> dict:
    """Train one setting one way; seconds per epoch (median step x steps per epoch), the setup's, the accuracy."""
    folder = scratch / f"{len(list(scratch.iterdir()))}"
    config = TrainConfig(method="s3", batch_size=32, eval_batch_size=64, num_epochs=args.epochs, seed=args.seed,
                         frozen_dropout=False, cache_features=cached, unimodal_baselines=False, save_steps=10**6,
                         eval_steps=10**6, output_dir=str(folder), feature_cache_dir=str(scratch / "features"),
                         **SETTINGS[name])
    trainer = StampedTrainer(config)
    began = time.perf_counter()
    trainer.setup()
    setup = time.perf_counter() - began
    metrics = trainer.train()
    per_epoch = len(trainer.stamps) // args.epochs
    step = statistics.median(b - a for a, b in zip(trainer.stamps, trainer.stamps[1:]))
    return {"setup_s": setup, "epoch_s": step * per_epoch, "steps": per_epoch, "accuracy": metrics["eval_accuracy"]}


def render(results: dict, args, elapsed: float) -> str:
    rows = []
    for name in SETTINGS:
        towers, cached = results[name, False], results[name, True]
        rows.append([name, f"{cached['steps']}", f"{towers['epoch_s']:.2f}", f"{cached['epoch_s']:.2f}",
                     f"{towers['epoch_s'] / cached['epoch_s']:.1f}x", f"{cached['setup_s'] - towers['setup_s']:.0f}",
                     f"{towers['accuracy']:.4f} / {cached['accuracy']:.4f}"])
    lines = ["# S3: training from cached tower features vs running the towers each step", "",
             f"Command: `python benchmarks/bench_s3_cache.py --epochs {args.epochs} --threads {args.threads}`", "",
             f"S3 paper design (recipe defaults), batch 32, {args.epochs} epochs, seed {args.seed}, towers without "
             "dropout on both paths; s / epoch = median optimiser step x steps per epoch; cache build = setup time "
             "with the cache minus without. "
             "Accuracies are of short runs (not the method's quality); equal accuracies show the two paths train the "
             "same model.", ""]
    lines += markdown_table(["setting", "steps / epoch", "towers: s / epoch", "cached: s / epoch", "speed-up",
                             "cache build (once) s", "accuracy towers / cached"], rows, right=range(1, 7))
    lines += ["", f"{run_footer(elapsed, HERE, args.threads)}", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "bench_s3_cache.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in SETTINGS:
            for cached in (False, True):
                results[name, cached] = run(name, cached, args, Path(scratch))
                print(name, "cached" if cached else "towers", results[name, cached], flush=True)
    report = render(results, args, time.perf_counter() - began)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
