"""Benchmark MoPE against full fine-tuning, plain deep prompts and the bare base model, on CPU.

    python benchmarks/bench_mope.py [--batch-size 8] [--steps 5] [--warmup 2] [--small]

Every variant lives in its own worker process (multiprocessing "spawn"), so that its peak memory is its own; the
parent drives the workers round-robin, one at a time (the order rotates every round), so that machine noise hits all
variants alike. Reported: median wall time per repetition, ratios of medians, the median of per-round paired ratios,
and peak resident memory (see ``_peak_memory``). Results go to stdout and to ``benchmarks/results/bench_mope.md``.

Variants
  training (forward + backward + AdamW step + zero_grad, train mode):
    mope         MoPEConfig() defaults: K=4; per vision block 6 static + 6 routed + 1 mapped prompt tokens (13),
                 per text block 4 deep prompt tokens, all as extra tokens each block processes (the default
                 prompt_mode="tokens", VPT-deep as the official code); trainable: prompts, routers, mapper,
                 classifier.
    deep-prompt  MoPEConfig(num_experts=0, static_prompt_length=13, mapped_prompt_length=0): one static prompt of 13
                 tokens per vision block (the text blocks keep their 4 deep prompt tokens), i.e. plain VPT-deep
                 prompts in the same mode (tokens), with the same dropout and no router, experts or mapper.
    full-ft      the base model, every parameter trainable.
  inference (eval mode, torch.no_grad forward):
    base         the base model without adapter.
    mope         MoPEConfig() defaults.
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

from harness import (
    environment,
    load_average,
    markdown_table,
    median_ratio,
    paired_ratio,
    reset_peak,
    status_kib,
    time_calls,
)

HERE = Path(__file__).resolve().parent
NUM_LABELS = 101

TRAIN_VARIANTS = ("mope", "deep-prompt", "full-ft")
INFER_VARIANTS = ("base", "mope")
DESCRIPTIONS = {
    ("train", "mope"): "MoPE (K=4, vision 6 static + 6 routed + 1 mapped, text 4 deep)",
    ("train", "deep-prompt"): "plain deep prompts (vision 13 static, text 4 deep; no router/experts/mapper)",
    ("train", "full-ft"): "full fine-tuning (all parameters)",
    ("infer", "base"): "base model (no adapter)",
    ("infer", "mope"): "MoPE (K=4, defaults)",
}


# ----------------------------------------------------------------------------------------------- memory helpers
def _peak_memory(peak_was_reset: bool) -> int:
    """Peak resident set size (KiB) since the last reset: VmHWM, or ru_maxrss (peak since process start)."""
    hwm = status_kib("VmHWM") if peak_was_reset else None
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# ----------------------------------------------------------------------------------------------- model building
def _tower_configs(small: bool):
    from transformers import BertConfig, ViTConfig

    if not small:
        return ViTConfig(), BertConfig()  # ViT-B/16 at 224 px, BERT-base
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return (ViTConfig(image_size=32, patch_size=8, **common),
            BertConfig(vocab_size=1000, max_position_embeddings=64, **common))


def _deep_prompt_config():
    """Plain deep prompts with MoPE's token counts: 13 static tokens per vision block, no experts, router or mapper."""
    from mmexperts import MoPEConfig

    default = MoPEConfig()
    tokens = default.static_prompt_length + default.prompt_length + default.mapped_prompt_length
    return MoPEConfig(num_experts=0, static_prompt_length=tokens, mapped_prompt_length=0)


def _build(kind: str, variant: str, small: bool):
    import peft

    import mmexperts  # noqa: F401  (registers the PEFT types)
    from mmexperts import MoPEConfig, VisionTextModelForClassification

    vision, text = _tower_configs(small)
    base = VisionTextModelForClassification.from_vision_text_configs(vision, text, num_labels=NUM_LABELS)
    info = {}
    if variant in ("mope", "deep-prompt"):
        model = peft.get_peft_model(base, _deep_prompt_config() if variant == "deep-prompt" else MoPEConfig())
        config = model.peft_config["default"]
        dynamic = config.prompt_length if config.num_experts else 0
        info["prompt_tokens"] = {
            "vision": [config.static_prompt_length + dynamic + config.mapped_prompt_length],
            "text": [config.complementary_prompt_length]}
    else:
        model = base
        if kind == "train":
            model.requires_grad_(True)
    model.train(kind == "train")
    if kind == "infer":
        model.requires_grad_(False)
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["total_params"] = sum(p.numel() for p in model.parameters())
    return model, info


def _batch(batch_size: int, text_length: int, small: bool):
    import torch

    vision, text = _tower_configs(small)
    generator = torch.Generator().manual_seed(1234)
    pixel_values = torch.randn(batch_size, vision.num_channels, vision.image_size, vision.image_size,
                               generator=generator)
    lengths = torch.randint(max(2, text_length // 4), text_length + 1, (batch_size,), generator=generator)
    lengths[0] = text_length  # at least one full row, the others padded
    attention_mask = (torch.arange(text_length)[None] < lengths[:, None]).long()
    input_ids = torch.randint(1000 if text.vocab_size > 2000 else 5, text.vocab_size, (batch_size, text_length),
                              generator=generator)
    input_ids[:, 0] = 101 if text.vocab_size > 2000 else 1
    input_ids = input_ids * attention_mask  # pad id 0
    labels = torch.randint(0, NUM_LABELS, (batch_size,), generator=generator)
    return dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _state_mib(model, optimizer) -> float:
    """MiB of parameters, the gradients of the trainable ones (alive during a step; ``zero_grad(set_to_none=True)``
    frees them between steps, so they are counted from the parameters) and the optimiser's state."""
    import torch

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if optimizer is not None:
        total += sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total / 2**20


# ----------------------------------------------------------------------------------------------- worker process
def _worker(conn, kind: str, variant: str, options: dict) -> None:
    try:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        torch.set_num_threads(options["threads"])
        torch.manual_seed(options["seed"])
        model, info = _build(kind, variant, options["small"])
        batch = _batch(options["batch_size"], options["text_length"], options["small"])
        optimizer = None
        if kind == "train":
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        else:
            batch = {k: v for k, v in batch.items() if k != "labels"}
        torch.manual_seed(options["seed"] + 1)

        def step() -> None:
            if kind == "train":
                out = model(**batch)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(**batch)

        gc.collect()
        info["rss_model_kib"] = status_kib("VmRSS")
        peak_was_reset = reset_peak()
        info["peak_source"] = "VmHWM after clear_refs" if peak_was_reset else "ru_maxrss (since process start)"
        conn.send(("ready", info))
        while True:
            command = conn.recv()
            if command == "step":
                conn.send(("time", time_calls(step, 1)[0]))
            elif command == "memory":
                info["peak_kib"] = _peak_memory(peak_was_reset)
                info["state_mib"] = _state_mib(model, optimizer)
                conn.send(("memory", info))
            else:
                break
    except BaseException:  # report the failure to the parent instead of hanging it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Worker:
    def __init__(self, context, kind: str, variant: str, options: dict):
        self.kind, self.variant = kind, variant
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, kind, variant, options), daemon=True)
        self.process.start()
        child.close()
        self.times: list[float] = []

    def request(self, command: str):
        self.conn.send(command)
        tag, payload = self.conn.recv()
        if tag == "error":
            raise RuntimeError(f"worker {self.kind}/{self.variant} failed:\n{payload}")
        return payload

    def wait_ready(self):
        tag, payload = self.conn.recv()
        if tag == "error":
            raise RuntimeError(f"worker {self.kind}/{self.variant} failed:\n{payload}")
        self.info = payload
        return payload

    def close(self):
        try:
            self.conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()


def _run_group(kind: str, variants, warmup: int, steps: int, options: dict, log) -> list[dict]:
    context = mp.get_context("spawn")
    workers = []
    try:
        for variant in variants:  # built one after another, so they do not compete for the cores
            start = time.perf_counter()
            worker = Worker(context, kind, variant, options)
            workers.append(worker)
            info = worker.wait_ready()
            log(f"  built {kind}/{variant} in {time.perf_counter() - start:.1f} s "
                f"({info['trainable_params']:,} trainable of {info['total_params']:,} parameters)")
        for repetition in range(warmup + steps):
            shift = repetition % len(workers)
            order = workers[shift:] + workers[:shift]  # rotate so that no variant always runs first or last
            times = {}
            for worker in order:
                times[worker.variant] = worker.request("step")
            measured = repetition >= warmup
            if measured:  # the i-th time of every variant comes from measured round i (paired ratios)
                for worker in workers:
                    worker.times.append(times[worker.variant])
            log(f"  {kind} round {repetition + 1}/{warmup + steps}{'' if measured else ' (warm-up)'}: " +
                ", ".join(f"{w.variant} {times[w.variant] * 1e3:.0f} ms" for w in order))
        results = []
        for worker in workers:
            memory = worker.request("memory")
            results.append(dict(kind=kind, variant=worker.variant, times=worker.times, **memory))
        return results
    finally:
        for worker in workers:
            worker.close()


# ----------------------------------------------------------------------------------------------- reporting
def _environment(options: dict) -> list[str]:
    return [
        f"- environment (torch threads per worker): {environment(options['threads'])}",
        f"- sizes: {'tiny smoke-test towers (--small)' if options['small'] else 'ViT-B/16 at 224 px + BERT-base'}, "
        f"random init, fp32, batch {options['batch_size']}, text length {options['text_length']} (padded rows), "
        f"{NUM_LABELS} labels",
        f"- repetitions: training {options['warmup']} warm-up + {options['steps']} measured, inference "
        f"{options['infer_warmup']} warm-up + {options['infer_steps']} measured, per variant, round-robin",
        f"- load average (1/5/15 min) at start: {options.get('load_start', '?')}, at end: in the environment line "
        "above (other processes on the machine inflate and scatter the times)",
    ]


def _median_ms(result) -> float:
    return statistics.median(result["times"]) * 1e3


def _table(results: list[dict], reference: str) -> list[str]:
    ref = next(r for r in results if r["variant"] == reference)
    ref_ms, ref_peak, ref_delta = _median_ms(ref), ref["peak_kib"], ref["peak_kib"] - ref["rss_model_kib"]
    rows = []
    for r in results:
        ms = _median_ms(r)
        delta = r["peak_kib"] - r["rss_model_kib"]
        rows.append([DESCRIPTIONS[(r["kind"], r["variant"])], f"{r['trainable_params']:,}",
                     f"{ms:,.0f} ({min(r['times']) * 1e3:,.0f}-{max(r['times']) * 1e3:,.0f})", f"{ms / ref_ms:.2f}",
                     f"{r['peak_kib'] / 1024:,.0f}", f"{r['peak_kib'] / ref_peak:.2f}", f"{delta / 1024:,.0f}",
                     f"{delta / ref_delta if ref_delta > 0 else math.nan:.2f}", f"{r['state_mib']:,.0f}"])
    return markdown_table(["variant", "trainable params", "median ms (min-max)", f"time / {reference}", "peak RSS MiB",
                           f"peak / {reference}", "peak - model RSS MiB", "ratio", "weights+grads+AdamW MiB"], rows,
                          right=range(1, 9), compact=True)


def _report(train: list[dict], infer: list[dict], options: dict, elapsed: float) -> str:
    by_name = {r["variant"]: r for r in train}
    infer_by_name = {r["variant"]: r for r in infer}
    mope, deep, full = by_name["mope"], by_name["deep-prompt"], by_name["full-ft"]
    peak_ratio = mope["peak_kib"] / full["peak_kib"]
    delta_ratio = (mope["peak_kib"] - mope["rss_model_kib"]) / (full["peak_kib"] - full["rss_model_kib"])
    time_ratio = median_ratio(mope["times"], deep["times"])
    paired = paired_ratio(mope["times"], deep["times"])
    min_ratio = min(mope["times"]) / min(deep["times"])
    full_ratio, full_min_ratio = median_ratio(mope["times"], full["times"]), min(mope["times"]) / min(full["times"])
    infer_min_ratio = min(infer_by_name["mope"]["times"]) / min(infer_by_name["base"]["times"])
    spread = max(statistics.median(r["times"]) / min(r["times"]) for r in train + infer)
    contended = spread > 1.2
    infer_ratio = median_ratio(infer_by_name["mope"]["times"], infer_by_name["base"]["times"])
    infer_paired = paired_ratio(infer_by_name["mope"]["times"], infer_by_name["base"]["times"])

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lines = ["# MoPE benchmark (CPU)", "", *_environment(options), "",
             "## Training step (forward + backward + AdamW step)", "", *_table(train, "full-ft"), "",
             "## Inference (eval, torch.no_grad forward)", "", *_table(infer, "base"), "",
             "## Targets", "",
             *(["(--small: tiny towers, where fixed overheads dominate; the targets only mean something at full "
                "size.)", ""] if options["small"] else []),
             f"- MoPE peak training memory / full fine-tuning: {peak_ratio:.2f} of the whole-process peak RSS, "
             f"{delta_ratio:.2f} of the peak above the built model's RSS (target <= 0.60): "
             f"{verdict(peak_ratio <= 0.60)} (whole process) / {verdict(delta_ratio <= 0.60)} (above model)",
             f"- MoPE step time / plain deep prompts: {time_ratio:.3f} (ratio of medians), {paired:.3f} (median of "
             f"per-round paired ratios), {min_ratio:.3f} (ratio of minima) (target <= 1.10): "
             f"{verdict(max(time_ratio, paired) <= 1.10)} on medians, {verdict(min_ratio <= 1.10)} on minima",
             f"- MoPE step time / full fine-tuning: {full_ratio:.3f} (ratio of medians), {full_min_ratio:.3f} "
             "(ratio of minima)",
             f"- MoPE inference / base model: {infer_ratio:.3f} (ratio of medians), {infer_paired:.3f} (paired), "
             f"{infer_min_ratio:.3f} (ratio of minima)",
             *([f"- WARNING: a variant's median time is up to {spread:.2f}x its minimum: the machine was busy "
                "with other work. Other load only ever adds time, so the minima are then the better estimate; "
                "re-run on a quiet machine or with more --steps."] if contended else []),
             "",
             "## Method", "",
             "- Each variant runs in its own spawned process; the parent asks them for one repetition at a time, "
             "round-robin with the order rotated every round, so slow phases of the machine hit every variant.",
             "- Peak memory: the process's peak resident set size (VmHWM), reset with `echo 5 > /proc/self/clear_refs` "
             "once the model, optimiser and batch are built, read after the last repetition. `peak RSS` is the "
             "whole process (Python, libraries, weights, activations, gradients, optimiser state); `peak - model RSS` "
             "subtracts the RSS just before the first step, leaving what training itself adds (activations, "
             "gradients, AdamW state). The other processes do not count. "
             f"Source used: {mope['peak_source']}.",
             "- Plain deep prompts: `MoPEConfig(num_experts=0, static_prompt_length=13, mapped_prompt_length=0)`, one "
             "static 13-token prompt per vision block (the same prompt mode, `prompt_mode=\"tokens\"` by default, and "
             "prompt dropout; text blocks keep 4 tokens), no router, experts or mapper.",
             f"- Total wall time of the benchmark: {elapsed:.0f} s.",
             ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--text-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="Measured training steps per variant.")
    parser.add_argument("--warmup", type=int, default=2, help="Unmeasured training steps per variant.")
    parser.add_argument("--infer-steps", type=int, default=12, help="Measured forward passes per variant.")
    parser.add_argument("--infer-warmup", type=int, default=2, help="Unmeasured forward passes per variant.")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count(), help="torch threads of each worker (they never run at once).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="Tiny towers: a smoke test that runs in seconds.")
    parser.add_argument("--output", type=Path, default=None,
                        help="Markdown output (default benchmarks/results/bench_mope.md, or bench_mope_small.md "
                             "with --small).")
    args = parser.parse_args(argv)
    if min(args.steps, args.infer_steps, args.batch_size, args.text_length) < 1 or min(args.warmup,
                                                                                      args.infer_warmup) < 0:
        parser.error("steps, batch size and text length must be positive, warm-up counts non-negative.")
    options = dict(batch_size=args.batch_size, text_length=args.text_length, steps=args.steps, warmup=args.warmup,
                   infer_steps=args.infer_steps, infer_warmup=args.infer_warmup, threads=args.threads,
                   seed=args.seed, small=args.small)
    output = args.output or HERE / "results" / ("bench_mope_small.md" if args.small else "bench_mope.md")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    options["load_start"] = load_average()
    start = time.perf_counter()
    log(f"load average at start: {options['load_start']}")
    log("training variants:")
    train = _run_group("train", TRAIN_VARIANTS, args.warmup, args.steps, options, log)
    log("inference variants:")
    infer = _run_group("infer", INFER_VARIANTS, args.infer_warmup, args.infer_steps, options, log)
    report = _report(train, infer, options, time.perf_counter() - start)
    print(report)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    log(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
