"""Soak test on CPU: does a long MoPE training run leak memory, and does the recipe survive non-finite steps?

    python benchmarks/bench_soak.py [--steps 3000] [--sample-every 25] [--threads 1] [--seed 0]
                                    [--variants mope,mope-no-onednn-cache,base] [--skip-trainer]

Part 1, memory: a tiny MoPE two-tower classifier (ViT + BERT built from configs, random init, fp32) trains for
``--steps`` optimiser steps in a plain loop (forward + backward + AdamW step + zero_grad) on random batches whose shapes
change every step: batch 1..32, text length 1..32, every row padded to a random length (right padding), with an eval
forward (no_grad) every 100 steps. The resident set size (``/proc/self/statm``) is sampled every ``--sample-every``
steps; the growth is the slope of a least-squares line over the second half of the run (the first half is warm-up:
allocator pools, lazy imports), in MiB per 1,000 steps. The peak is the kernel's VmHWM, reset once the model is
built. Each variant runs in its own spawned process, on the same batches:
  mope                  MoPE as above, default settings.
  mope-no-onednn-cache  the same with ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``: oneDNN keeps one compiled primitive per
                        new input shape (up to 1,024 by default), so random shapes alone make RSS climb until that
                        cache is full; without the cache, what is left is growth that the training code causes.
  base                  the base model without adapter (only the classifier head trains), default settings: what
                        torch and the towers do alone.

Part 2, non-finite steps through the real ``mmexperts.training.Trainer`` (tiny local ViT/BERT folders, synthetic
entailment): NaN pixel values are injected into chosen training batches (a ``Trainer`` subclass whose
``model_inputs`` fills ``pixel_values`` with NaN). Checked: ``metrics.json``'s ``nonfinite_steps`` equals the number
of injected steps, the run reaches ``max_steps``, the weights do not move on an injected step and stay finite; and a
run with ``max_nonfinite_in_a_row`` injected steps in a row stops with ``NonFiniteLossError``.

Results: a markdown table on stdout, ``benchmarks/results/soak.json`` and ``benchmarks/results/soak_rss.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

from harness import environment, markdown_table, reset_peak, status_kib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
NUM_LABELS = 3
IMAGE_SIZE, VOCAB, HIDDEN = 30, 99, 32
EVAL_EVERY = 100


# ----------------------------------------------------------------------------------------------- memory helpers
def rss_mib() -> float:
    """Current resident set size of this process in MiB (``/proc/self/statm``; ``resource`` peak as a fallback)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float, float]:
    """Least-squares slope, intercept, R² and the slope's standard error of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    slope = sxy / sxx if sxx else 0.0
    intercept = my - slope * mx
    r2 = sxy * sxy / (sxx * syy) if sxx and syy else 0.0
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    stderr = math.sqrt(residual / (n - 2) / sxx) if n > 2 and sxx else math.inf
    return slope, intercept, r2, stderr


# ----------------------------------------------------------------------------------------------- part 1: soak
def build_model(seed: int, adapter: bool = True):
    import peft
    import torch
    from transformers import BertConfig, ViTConfig

    import mmexperts  # noqa: F401  (registers the PEFT types)
    from mmexperts import MoPEConfig, VisionTextModelForClassification

    torch.manual_seed(seed)
    vision = ViTConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=IMAGE_SIZE, patch_size=6)
    text = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=64)
    base = VisionTextModelForClassification.from_vision_text_configs(vision, text, num_labels=NUM_LABELS,
                                                                     classifier_input="vision")
    if not adapter:
        for name, parameter in base.named_parameters():
            parameter.requires_grad_(name.startswith("classifier"))
        return base.train()
    model = peft.get_peft_model(base, MoPEConfig(init_weights=False))
    return model.train()


def random_batch(rng: random.Random, generator, max_batch: int, max_text: int) -> tuple[dict, int, int]:
    """A batch of random size and text length; every row padded (right, pad id 0) to a random length."""
    import torch

    size, length = rng.randint(1, max_batch), rng.randint(1, max_text)
    lengths = torch.tensor([rng.randint(1, length) for _ in range(size)])
    if rng.random() < 0.5:
        lengths[rng.randrange(size)] = length  # half the batches have a full row, the others only padded ones
    attention_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    input_ids = torch.randint(5, VOCAB, (size, length), generator=generator) * attention_mask
    input_ids[:, 0] = 2  # [CLS]-like first token, always real
    batch = {"pixel_values": torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
             "input_ids": input_ids, "attention_mask": attention_mask,
             "labels": torch.randint(0, NUM_LABELS, (size,), generator=generator)}
    return batch, size, length


def malloc_trim() -> bool:
    """Hand the C heap's free memory back to the system (glibc); False where that is not available."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def soak(steps: int, sample_every: int, seed: int, max_batch: int, max_text: int, log, adapter: bool = True,
         label: str = "soak") -> dict:
    import torch

    model = build_model(seed, adapter)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    gc.collect()
    peak_was_reset = reset_peak()
    samples = [(0, rss_mib())]
    objects = {0: len(gc.get_objects())}
    start_rss, losses, nonfinite, started = samples[0][1], [], 0, time.perf_counter()
    step_times = []
    for step in range(1, steps + 1):
        batch, size, length = random_batch(rng, generator, max_batch, max_text)
        tic = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - tic)
        value = loss.item()
        nonfinite += not math.isfinite(value)
        losses.append(value)
        if step % EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                eval_batch, _, _ = random_batch(rng, generator, max_batch, max_text)
                model(**{k: v for k, v in eval_batch.items() if k != "labels"})
            model.train()
        if step % sample_every == 0 or step == steps:
            samples.append((step, rss_mib()))
            if step == steps // 2 or step == steps:
                objects[step] = len(gc.get_objects())
        if step % max(steps // 5, 1) == 0:
            recent = losses[-100:]
            log(f"  {label}: step {step}/{steps}: RSS {samples[-1][1]:.1f} MiB, loss {sum(recent) / len(recent):.3f} "
                f"(mean of last 100), {time.perf_counter() - started:.0f} s")
    elapsed = time.perf_counter() - started
    peak = status_kib("VmHWM") if peak_was_reset else None
    second = [(s, r) for s, r in samples if s >= steps / 2]
    first = [(s, r) for s, r in samples if s <= steps / 2]
    slope, intercept, r2, stderr = linear_fit([s for s, _ in second], [r for _, r in second])
    first_slope, _, _, _ = linear_fit([s for s, _ in first], [r for _, r in first])
    step_times.sort()
    before_trim = rss_mib()
    trimmed = rss_mib() if malloc_trim() else None
    return {
        "rss_after_malloc_trim_mib": trimmed, "rss_before_malloc_trim_mib": before_trim,
        "steps": steps, "sample_every": sample_every, "samples": samples, "start_rss_mib": start_rss,
        "end_rss_mib": samples[-1][1], "max_sampled_rss_mib": max(r for _, r in samples),
        "peak_rss_mib": peak / 1024 if peak is not None else max(r for _, r in samples),
        "peak_source": "VmHWM after clear_refs" if peak is not None else "max of samples",
        "growth_mib_per_1000_steps": slope * 1000, "fit_intercept_mib": intercept, "fit_r2": r2,
        "growth_stderr_mib_per_1000_steps": stderr * 1000,
        "first_half_growth_mib_per_1000_steps": first_slope * 1000,
        "second_half_rise_mib": second[-1][1] - second[0][1],
        "python_objects": objects, "nonfinite_losses": nonfinite,
        "loss_first_100": sum(losses[:100]) / len(losses[:100]),
        "loss_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "median_step_ms": step_times[len(step_times) // 2] * 1e3, "wall_s": elapsed,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


VARIANTS = {
    "mope": ("MoPE", {}, True),
    "mope-no-onednn-cache": ("MoPE, oneDNN cache off", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}, True),
    "base": ("base, head only", {}, False),
}


def soak_worker(variant: str, options: dict) -> dict:
    """One variant in a fresh process: its environment set before torch is imported."""
    _, env, adapter = VARIANTS[variant]
    os.environ.update(env)
    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(options["threads"])

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = soak(options["steps"], options["sample_every"], options["seed"], options["max_batch"],
                  options["max_text"], log, adapter=adapter, label=variant)
    return {"variant": variant, "env": env, "adapter": adapter, **result}


def run_variants(variants: list[str], options: dict) -> list[dict]:
    """Every variant in its own spawned process, one after the other (so that they never share the cores)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    results = []
    for variant in variants:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            results.append(pool.submit(soak_worker, variant, options).result())
    return results


# ----------------------------------------------------------------------------------------------- part 2: Trainer
def build_backbones(folder: Path) -> tuple[str, str]:
    """Tiny random ViT and BERT folders with an image processor and the synthetic task's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, ViTConfig, ViTImageProcessor, ViTModel

    from mmexperts.offline.synthetic import build_tokenizer

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=32, patch_size=8)).save_pretrained(folder / "vision")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "vision")
    tokenizer = build_tokenizer()
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64)).save_pretrained(folder / "text")
    tokenizer.save_pretrained(folder / "text")
    return str(folder / "vision"), str(folder / "text")


def nan_trainer(nan_steps: set[int]):
    """A ``Trainer`` that feeds NaN pixel values on the optimiser steps in ``nan_steps`` (1-based) and records the
    trainable weights after every step."""
    import torch

    from mmexperts.training import Trainer

    class NaNTrainer(Trainer):
        injected: list[int]
        weights: dict[int, list]

        def model_inputs(self, batch: dict, return_loss: bool = True) -> dict:
            inputs = super().model_inputs(batch, return_loss)
            if self.model.training and self.state.step + 1 in nan_steps:
                self.injected.append(self.state.step + 1)
                inputs = {**inputs, "pixel_values": torch.full_like(inputs["pixel_values"], float("nan"))}
            return inputs

        def on_step_end(self, loss: float) -> None:
            self.weights[self.state.step] = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]
            super().on_step_end(loss)

        def setup(self) -> None:
            super().setup()
            self.injected, self.weights = [], {}
            self.weights[self.state.step] = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]

    return NaNTrainer


def nonfinite_runs(folder: Path, backbones: tuple[str, str], log) -> dict:
    import torch

    from mmexperts.errors import NonFiniteLossError
    from mmexperts.training import TrainConfig

    vision, text = backbones
    common = dict(vision_model=vision, text_model=text, train_size=64, eval_size=32, batch_size=8,
                  eval_batch_size=16, warmup_steps=0, eval_steps=5, save_steps=5, logging_steps=1,
                  learning_rate=1e-2, method_config={"init_weights": False}, unimodal_baselines=False,
                  max_nonfinite_in_a_row=3)
    report = {}

    # (a) scattered NaN steps, at most 2 in a row: skipped, counted, training goes on
    nan_steps = {3, 8, 9, 14, 17}
    config = TrainConfig(output_dir=str(folder / "scattered"), max_steps=20, **common)
    trainer = nan_trainer(nan_steps)(config)
    output = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(io.StringIO()):  # + progress bars
        results = trainer.train()
    metrics = json.loads((folder / "scattered" / "metrics.json").read_text())
    weights = trainer.weights
    unchanged = [s for s in sorted(weights) if s - 1 in weights and
                 all(torch.equal(a, b) for a, b in zip(weights[s - 1], weights[s]))]
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    buffers_finite = all(bool(torch.isfinite(b).all()) for b in trainer.model.buffers() if b.is_floating_point())
    checkpoint_state = json.loads((folder / "scattered" / "checkpoints" / "step_20" / "trainer_state.json").read_text())
    skipped_lines = output.getvalue().count("update skipped")
    report["scattered"] = {
        "max_steps": 20, "max_nonfinite_in_a_row": 3, "injected_steps": sorted(trainer.injected),
        "metrics_nonfinite_steps": metrics["nonfinite_steps"], "metrics_steps": metrics["steps"],
        "checkpoint_nonfinite_steps": checkpoint_state["nonfinite_steps"], "skipped_messages": skipped_lines,
        "steps_without_weight_change": unchanged, "weights_finite": finite, "buffers_finite": buffers_finite,
        "eval_accuracy": results.get("eval_accuracy"), "wall_s": time.perf_counter() - started,
        "ok": (metrics["nonfinite_steps"] == len(nan_steps) == len(trainer.injected) == skipped_lines ==
               checkpoint_state["nonfinite_steps"] and metrics["steps"] == 20 and unchanged == sorted(nan_steps)
               and finite and buffers_finite),
    }
    log(f"  scattered NaN steps {sorted(nan_steps)}: {report['scattered']}")

    # (b) max_nonfinite_in_a_row NaN steps in a row: NonFiniteLossError at the last of them
    nan_steps = {6, 7, 8}
    config = TrainConfig(output_dir=str(folder / "in_a_row"), max_steps=20, **common)
    trainer = nan_trainer(nan_steps)(config)
    output, error, started = io.StringIO(), None, time.perf_counter()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(io.StringIO()):
        try:
            trainer.train()
        except NonFiniteLossError as caught:
            error = caught
    checkpoints = sorted(p.name for p in (folder / "in_a_row" / "checkpoints").iterdir())
    report["in_a_row"] = {
        "max_steps": 20, "max_nonfinite_in_a_row": 3, "injected_steps": sorted(trainer.injected),
        "error": f"{type(error).__name__}: {error}" if error else None, "stopped_at_step": trainer.state.step,
        "state_nonfinite_steps": trainer.state.nonfinite_steps,
        "metrics_json_written": (folder / "in_a_row" / "metrics.json").exists(), "checkpoints_left": checkpoints,
        "wall_s": time.perf_counter() - started,
        "ok": error is not None and trainer.state.step == 8 and trainer.injected == [6, 7, 8]
              and "3 steps in a row" in str(error),
    }
    log(f"  NaN steps {sorted(nan_steps)} in a row: {report['in_a_row']}")
    return report


# ----------------------------------------------------------------------------------------------- reporting
def describe(args) -> list[str]:
    """The report's header bullets: the environment (load average at the end of the run), then the soak's setup."""
    return [
        f"- environment: {environment(args.threads)}",
        f"- soak: MoPE defaults (K=4, init_weights=False, prompt tokens) on a ViT ({IMAGE_SIZE} px, patch 6) + BERT, "
        f"hidden {HIDDEN}, 2 layers each, fp32, AdamW lr 1e-3; batch 1..{args.max_batch}, text length "
        f"1..{args.max_text}, random right padding; eval forward every {EVAL_EVERY} steps; seed {args.seed}; "
        "each variant in its own process, same batches",
    ]


def leak_verdict(results: list[dict], max_growth: float) -> tuple[bool, str]:
    """FAIL when the variant without shape caches (or, failing that, the first) grows significantly faster than
    ``max_growth``: slope - 2 standard errors above it (RSS samples scatter by a few MiB as the C heap breathes)."""
    control = next((r for r in results if r["variant"] == "mope-no-onednn-cache"), results[0])
    slope, stderr = control["growth_mib_per_1000_steps"], control["growth_stderr_mib_per_1000_steps"]
    ok = slope - 2 * stderr <= max_growth
    return ok, (f"{control['variant']}: {slope:+.2f} ± {stderr:.2f} MiB per 1k steps, lower 2-sigma bound "
                f"{slope - 2 * stderr:+.2f} {'<=' if ok else '>'} {max_growth}")


def soak_table(results: list[dict], max_growth: float) -> list[str]:
    def row(name: str, cell) -> list[str]:
        return [name, *(cell(r) for r in results)]

    trim = [r for r in results if r["rss_after_malloc_trim_mib"] is not None]
    ok, detail = leak_verdict(results, max_growth)
    rows = [row("steps (RSS sampled every N)", lambda r: f"{r['steps']:,} ({r['sample_every']})"),
            row("trainable parameters", lambda r: f"{r['trainable_params']:,}"),
            row("median step time", lambda r: f"{r['median_step_ms']:.1f} ms"),
            row("wall time", lambda r: f"{r['wall_s']:.0f} s"),
            row("RSS at start (model built)", lambda r: f"{r['start_rss_mib']:.1f} MiB"),
            row("RSS at end", lambda r: f"{r['end_rss_mib']:.1f} MiB"),
            row("peak RSS (VmHWM after reset)", lambda r: f"{r['peak_rss_mib']:.1f} MiB"),
            row("growth, first half (warm-up)", lambda r: f"{r['first_half_growth_mib_per_1000_steps']:+.2f} MiB/1k"),
            row("**growth, second half (fit)**",
                lambda r: f"**{r['growth_mib_per_1000_steps']:+.2f} ± {r['growth_stderr_mib_per_1000_steps']:.2f} "
                          f"MiB/1k** (R² {r['fit_r2']:.2f})"),
            row("RSS rise over the second half", lambda r: f"{r['second_half_rise_mib']:+.1f} MiB")]
    if trim:
        rows.append(row("RSS after malloc_trim(0) at end", lambda r: "n/a" if r["rss_after_malloc_trim_mib"] is None
                        else f"{r['rss_after_malloc_trim_mib']:.1f} MiB"))
    rows += [row("Python objects (start / half / end)",
                 lambda r: " / ".join(f"{v:,}" for _, v in sorted(r["python_objects"].items(),
                                                                    key=lambda kv: int(kv[0])))),
             row("loss, first / last 100 steps", lambda r: f"{r['loss_first_100']:.3f} / {r['loss_last_100']:.3f}"),
             row("non-finite losses", lambda r: str(r["nonfinite_losses"]))]
    return [*markdown_table(["measure", *(VARIANTS[r["variant"]][0] for r in results)], rows,
                            right=range(1, len(results) + 1), compact=True),
            "", f"Leak verdict (second-half growth without oneDNN's shape cache not significantly above {max_growth} "
                f"MiB per 1,000 steps): **{'PASS' if ok else 'FAIL'}** ({detail}). With default settings RSS keeps "
                "climbing as long as new batch shapes arrive: oneDNN compiles and caches one primitive per new shape "
                "(bounded by ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1,024 by default); the cache-off run shows what is left."]


def nonfinite_table(nonfinite: dict) -> list[str]:
    a, b = nonfinite["scattered"], nonfinite["in_a_row"]
    return markdown_table(
        ["Trainer run (max_steps 20, max_nonfinite_in_a_row 3)", "NaN pixel_values at steps", "outcome", "check"],
        [["scattered, at most 2 in a row", str(a["injected_steps"]),
          f"metrics.json nonfinite_steps={a['metrics_nonfinite_steps']}, steps={a['metrics_steps']}; step_20 "
          f"checkpoint nonfinite_steps={a['checkpoint_nonfinite_steps']}; {a['skipped_messages']} 'update skipped' "
          f"messages; weights unchanged exactly at steps {a['steps_without_weight_change']}; weights and buffers "
          f"finite: {a['weights_finite'] and a['buffers_finite']}", "PASS" if a["ok"] else "FAIL"],
         ["3 in a row", str(b["injected_steps"]),
          f"stopped at step {b['stopped_at_step']} with `{(b['error'] or 'no error').split(':')[0]}` "
          f"(\"{(b['error'] or '').split(': ', 1)[-1][:60]}...\"); metrics.json written: "
          f"{b['metrics_json_written']}; checkpoints left {b['checkpoints_left']}", "PASS" if b["ok"] else "FAIL"]],
        compact=True)


def plot(results: list[dict], path: Path) -> None:
    from mmexperts.plots import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for result in results:
        steps, rss = zip(*result["samples"])
        line, = axes.plot(steps, rss, lw=1, label=f"{VARIANTS[result['variant']][0]} (peak "
                                                  f"{result['peak_rss_mib']:.0f} MiB)")
        slope = result["growth_mib_per_1000_steps"] / 1000
        xs = [s for s in steps if s >= result["steps"] / 2]
        axes.plot(xs, [result["fit_intercept_mib"] + slope * x for x in xs], "--", color=line.get_color(),
                  label=f"  fit, 2nd half: {result['growth_mib_per_1000_steps']:+.2f} MiB / 1k steps")
    axes.axvline(results[0]["steps"] / 2, color="grey", lw=0.8, ls=":")
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("resident set size (MiB)")
    axes.set_title("Soak: RSS vs step, random batch shapes")
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="Optimiser steps of each soak loop.")
    parser.add_argument("--sample-every", type=int, default=25, help="Sample the RSS every N steps.")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-text", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, of {', '.join(VARIANTS)}.")
    parser.add_argument("--max-growth", type=float, default=1.0,
                        help="Leak verdict: FAIL when the second-half growth is more than 2 standard errors above "
                             "this many MiB per 1,000 steps (judged on mope-no-onednn-cache when it runs).")
    parser.add_argument("--skip-trainer", action="store_true", help="Only the soak loops (no non-finite runs).")
    parser.add_argument("--output-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if min(args.steps, args.sample_every, args.max_batch, args.max_text, args.threads) < 1 or \
            args.steps < 4 * args.sample_every:
        parser.error("steps, sample-every, max-batch, max-text and threads must be positive, steps >= 4 samples.")
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    options = dict(steps=args.steps, sample_every=args.sample_every, seed=args.seed, max_batch=args.max_batch,
                   max_text=args.max_text, threads=args.threads)
    log(f"soak: {args.steps} steps per variant: {', '.join(variants)}")
    results = run_variants(variants, options)
    nonfinite = None
    if not args.skip_trainer:
        log("non-finite steps through the Trainer:")
        with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
            os.environ.setdefault("HF_HOME", str(Path(tmp) / "hf-home"))
            nonfinite = nonfinite_runs(Path(tmp), build_backbones(Path(tmp)), log)
    elapsed = time.perf_counter() - started
    header = describe(args)
    lines = ["# Soak benchmark (CPU)", "", *header, f"- total wall time: {elapsed:.0f} s", "",
             "## Memory over a long run", "", *soak_table(results, args.max_growth)]
    if nonfinite:
        lines += ["", "## Non-finite steps through the Trainer", "", *nonfinite_table(nonfinite)]
    print("\n".join(lines))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(["python", "benchmarks/bench_soak.py", *(sys.argv[1:] if argv is None else argv)]),
               "environment": header, "total_wall_s": elapsed, "max_growth_mib_per_1000_steps":
               args.max_growth, "leak_verdict_pass": leak_verdict(results, args.max_growth)[0],
               "soak": results, "nonfinite": nonfinite, "report_markdown": "\n".join(lines)}
    (args.output_dir / "soak.json").write_text(json.dumps(payload, indent=2))
    plot(results, args.output_dir / "soak_rss.png")
    log(f"written to {args.output_dir / 'soak.json'} and {args.output_dir / 'soak_rss.png'}")
    ok = leak_verdict(results, args.max_growth)[0] and (
        nonfinite is None or (nonfinite["scattered"]["ok"] and nonfinite["in_a_row"]["ok"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
