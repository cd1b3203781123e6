"""Alt-MoE connector training from cached tower features vs running the frozen towers every step, through the
recipe (``mmexperts.training.Trainer``, whose steps the training engine runs), side by side in one process.

    python benchmarks/bench_altmoe_cache.py [--epochs 2] [--threads 1]

Two settings: the offline benchmark (synthetic:retrieval, the tiny pretrained ViT + BERT) and real towers
(fashion:retrieval, CLIP ViT-B/16's image tower, all 12 blocks at 64 px, + all-MiniLM-L6-v2). Each trains the same
connector with the same seed and data order (every caption of every image) twice: ``--cache_features`` (the towers
run once, then training reads the stored features) and ``--no cache`` (both towers run on every batch; their dropout
is off, ``--no_frozen_dropout``, so both see the same features). Reported: the median optimiser-step time, the time
per epoch (steps per epoch x median step), the one-off cache build, and the final Recall@1 of each; and where a step
goes: the model's forward (the towers, if they run, and the connector), the backward, the optimiser update and the
rest (fetching and collating the batch, the engine's bookkeeping), as means per step.
Results go to stdout and ``benchmarks/results/bench_altmoe_cache.md``; ``--settings`` runs some of the settings only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from mmexperts.offline.backbones import pretrained_backbones
from mmexperts.offline.real_towers import real_towers
from mmexperts.training import TrainConfig, Trainer

from harness import markdown_table, run_footer

HERE = Path(__file__).resolve().parent
CONNECTOR = {"num_experts": 8, "top_k": 2, "hidden_size": 128, "dropout": 0.1}
SETTINGS = {
    "synthetic (tiny ViT + BERT)": dict(dataset="synthetic:retrieval", vision_model="synthetic",
                                        text_model="synthetic", train_size=2000, eval_size=500),
    "fashion (CLIP ViT-B/16 @ 64 px + MiniLM-L6)": dict(dataset="fashion:retrieval", vision_model="real",
                                                        text_model="real", vision_image_size=64, train_size=256,
                                                        eval_size=500),
}


PHASES = ("forward", "backward", "update")


class TimedTrainer(Trainer):
    """Records when each optimiser step ends, and the time spent so far in the model's forward, the backward and the
    optimiser update (``phases``, one snapshot per step)."""

    def setup(self) -> None:
        super().setup()
        self.stamps, self.phases, self.spent = [], [], Counter()
        for owner, name, phase in zip((self.model, self.accelerator, self.optimizer), ("forward", "backward", "step"),
                                      PHASES):
            setattr(owner, name, self._timed(getattr(owner, name), phase))

    def _timed(self, call, phase: str):
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.spent[phase] += time.perf_counter() - began

        return timed

    def on_step_end(self, loss: float) -> None:
        self.stamps.append(time.perf_counter())
        self.phases.append(dict(self.spent))
        super().on_step_end(loss)


def run(setting: dict, cached: bool, epochs: int, folder: Path, cache_dir: Path, seed: int) -> dict:
    config = TrainConfig(method="altmoe", method_config=dict(CONNECTOR), output_dir=str(folder), seed=seed,
                         cache_features=cached, feature_cache_dir=str(cache_dir), frozen_dropout=False,
                         batch_size=64, eval_batch_size=250, num_epochs=epochs, learning_rate=3e-3,
                         weight_decay=5e-3, warmup_steps=20, eval_steps=10**9, save_steps=10**9,
                         overwrite_output_dir=True, **setting)
    trainer = TimedTrainer(config)
    began = time.perf_counter()
    trainer.setup()
    setup = time.perf_counter() - began
    results = trainer.train()
    steps = [b - a for a, b in zip(trainer.stamps, trainer.stamps[1:])]  # the first step's start is not recorded
    step = statistics.median(steps)
    per_epoch = len(trainer.train_loader)
    first, last = trainer.phases[0], trainer.phases[-1]
    phases = {phase: (last.get(phase, 0) - first.get(phase, 0)) / len(steps) for phase in PHASES}
    phases["rest"] = statistics.mean(steps) - sum(phases.values())
    return {"setup_s": setup, "step_s": step, "epoch_s": step * per_epoch, "steps_per_epoch": per_epoch,
            "pairs": len(trainer.train_loader.dataset), "i2t_r1": results["eval_i2t_r1"],
            "t2i_r1": results["eval_t2i_r1"], "rsum": results["eval_rsum"], "mean_step_s": statistics.mean(steps),
            **{f"{phase}_s": seconds for phase, seconds in phases.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--output", type=Path, default=HERE / "results" / "bench_altmoe_cache.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    pretrained_backbones(seed=args.seed), real_towers()  # built or fetched once, outside the timings
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.settings:
            for cached in (True, False):
                out = run(SETTINGS[name], cached, args.epochs, Path(scratch) / f"run-{len(results)}",
                          Path(scratch) / "features", args.seed)
                results[name, cached] = out
                print(f"{name}, {'cached' if cached else 'towers'}: {out}", flush=True)
    report = render(results, args, time.perf_counter() - began)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    return 0


def render(results: dict, args, elapsed: float) -> str:
    lines = ["# Alt-MoE: training from cached tower features vs running the towers each step", "",
             f"Command: `python benchmarks/bench_altmoe_cache.py --epochs {args.epochs} --threads {args.threads}`", "",
             f"Connector: top-{CONNECTOR['top_k']} of {CONNECTOR['num_experts']} experts, width "
             f"{CONNECTOR['hidden_size']}, alternating directions, batch 64, AdamW lr 3e-3, {args.epochs} epochs, "
             "every caption of every image (5 per image on Fashion, 2 on the synthetic data), seed "
             f"{args.seed}; evaluation on held-out images (caption 0 each). Cache build = setup time with the cache "
             "minus setup time without it (the towers encode each training image and caption once, and each "
             "evaluation pair once).", ""]
    speed = []
    for name in dict.fromkeys(name for name, _ in results):
        cached, towers = results[name, True], results[name, False]
        speed.append([name, f"{cached['pairs']}", f"{cached['steps_per_epoch']}", f"{towers['epoch_s']:.1f}",
                      f"{cached['epoch_s']:.2f}", f"{towers['epoch_s'] / cached['epoch_s']:.0f}x",
                      f"{cached['setup_s'] - towers['setup_s']:.0f}",
                      f"{towers['i2t_r1']:.1f} / {cached['i2t_r1']:.1f}",
                      f"{towers['t2i_r1']:.1f} / {cached['t2i_r1']:.1f}"])
    lines += markdown_table(["setting", "training pairs", "steps / epoch", "towers: s / epoch", "cached: s / epoch",
                             "speed-up", "cache build (once) s", "R@1 I->T towers / cached",
                             "R@1 T->I towers / cached"], speed, right=range(1, 9))
    lines += ["", "Where a step goes (ms, means per step; the median step is what the table above multiplies): the "
              "model's forward (the towers when they run, then the connector), the backward, the optimiser update, "
              "and the rest (fetching and collating the batch, the engine's bookkeeping and callbacks).", ""]
    lines += markdown_table(["setting", "path", "median step", "forward", "backward", "update", "rest"],
                            ([name, "cached" if cached else "towers", f"{out['step_s'] * 1e3:.1f}",
                              *(f"{out[f'{phase}_s'] * 1e3:.1f}" for phase in (*PHASES, "rest"))]
                             for (name, cached), out in results.items()), right=range(2, 7))
    lines += ["", "Caching removes the towers and the collation of images and captions from each step; the "
              "connector's own forward, backward and update remain, and bound the speed-up at (towers step) / "
              "(connector's share of a cached step):", ""]
    for name in dict.fromkeys(name for name, _ in results):
        cached, towers = results[name, True], results[name, False]
        connector = sum(cached[f"{phase}_s"] for phase in PHASES)
        lines.append(f"- {name}: the connector takes {connector * 1e3:.0f} ms of a cached step's "
                     f"{cached['mean_step_s'] * 1e3:.0f} ms; a step with the towers takes "
                     f"{towers['mean_step_s'] * 1e3:.0f} ms, so the bound is "
                     f"{towers['mean_step_s'] / connector:.1f}x.")
    lines += ["", f"Busy shared cores: {run_footer(elapsed, HERE)}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
