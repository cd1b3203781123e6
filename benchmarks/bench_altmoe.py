"""Benchmark Alt-MoE on the offline caption <-> image benchmark, over the frozen tiny pretrained towers.

    python benchmarks/bench_altmoe.py [--steps 600] [--train-size 4000] [--eval-size 1000] [--threads 1]

The towers (the offline benchmark's pretrained tiny ViT and BERT) run once: their token features are cached with
``mmexperts.altmoe.features.cache_features`` (every caption of every image), and every variant then trains its
connector on the cached features with the same seed, data order, optimiser and step count. Evaluation searches
``mmexperts.VectorStore`` indexes of the gallery side (exact inner product) and reports Recall@1/5/10 in both
directions and RSUM, under the multi-caption protocol (every caption; an image query hits if any of its captions
ranks in the top K) and the pairwise protocol (one caption per image).

Variants (all: width 128, top-2 of 8 experts unless noted, tau 0.03, alpha 0.5, smooth-L1, AdamW lr 3e-3,
batch 128, linear warm-up over 5 % of the steps, gradient clipping 1.0)
  untrained          the connector at initialisation (init_weights=False: reference init), no training
  moe-alternating    the paper's recipe: one direction per optimiser step, strictly alternating
  moe-joint          both directions' losses summed every step (same number of optimiser steps)
  moe-joint-half     joint, half the steps (the same number of per-direction updates as alternating)
  mlp-alternating    a plain MLP connector (one expert, inner width 8 x 128, so the same parameter count up to the
                     gate), alternating
Speed: connector training-step time (forward + backward + AdamW) on cached features with sparse top-k expert dispatch
(each expert runs only on its tokens) vs dense dispatch (every expert on every token, as the official code), medians
over interleaved repetitions in one process. Results go to stdout and to ``benchmarks/results/bench_altmoe.md``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel

from mmexperts import AltMoEConfig, VectorStore, retrieval_recall
from mmexperts.altmoe.features import CachedFeatures, FeatureConnector, cache_features
from mmexperts.data.collate import MultimodalCollator
from mmexperts.data.loading import load_task
from mmexperts.offline.backbones import pretrained_backbones
from mmexperts.training.alternating import DirectionSchedule
from mmexperts.training.engine import Engine, adamw_with_lr_scheduler

from harness import environment, markdown_table, time_rounds

HERE = Path(__file__).resolve().parent
WIDTH, EXPERTS, TOP_K = 128, 8, 2
BASE = dict(num_experts=EXPERTS, top_k=TOP_K, hidden_size=WIDTH, dropout=0.1, temperature=0.03, alpha=0.5)
VARIANTS = {
    "untrained": (dict(BASE, init_weights=False), None, 0.0),
    "moe-alternating": (BASE, "alternating", 1.0),
    "moe-joint": (dict(BASE, direction_schedule="joint"), "joint", 1.0),
    "moe-joint-half": (dict(BASE, direction_schedule="joint"), "joint", 0.5),
    "mlp-alternating": (dict(BASE, num_experts=1, top_k=1, expert_hidden_size=EXPERTS * WIDTH), "alternating", 1.0),
}


def build_model(backbones, config: AltMoEConfig, seed: int):
    base = VisionTextDualEncoderModel.from_vision_text_pretrained(str(backbones.vision), str(backbones.text))
    torch.manual_seed(seed)
    return peft.get_peft_model(base, config)


def cache_split(model, task, split: str, collator_kwargs: dict, folder: Path, captions: int, batch_size: int):
    """Cache features of every (image, caption) pair of a split: caption c of every image in file ``c``."""
    paths = []
    for caption in range(captions):
        path = folder / f"{split}_{caption}"
        if not path.exists():
            collator = MultimodalCollator(**collator_kwargs, caption_index=caption)
            loader = DataLoader(task.dataset[split], batch_size=batch_size, collate_fn=collator)
            cache_features(model, loader, path)
        paths.append(path)
    return [CachedFeatures(path) for path in paths]


def concat(parts: list[CachedFeatures]) -> dict[str, torch.Tensor]:
    length = max(p.tensors["text_tokens"].shape[1] for p in parts)
    out = {}
    for key in parts[0].tensors:
        tensors = [p.tensors[key] for p in parts]
        if key.startswith("text"):
            pad = [(0, 0, 0, length - t.shape[1]) if t.dim() == 3 else (0, length - t.shape[1]) for t in tensors]
            tensors = [torch.nn.functional.pad(t, p) for t, p in zip(tensors, pad)]
        out[key] = torch.cat(tensors)
    return out


class Rows(torch.utils.data.Dataset):
    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors["image_tokens"])

    def __getitem__(self, index):
        return {k: v[index] for k, v in self.tensors.items()}


def train(model, rows: Rows, mode: str | None, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Train the connector on cached rows with the training engine and the given direction schedule (AdamW, linear
    warm-up over 5 % of the steps then constant, clipping 1.0); returns the loss per step."""
    module = FeatureConnector(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = adamw_with_lr_scheduler(params, lr, steps, weight_decay=5e-3, warmup=max(1, steps // 20),
                                               decay="constant")
    schedule = DirectionSchedule(model.base_model.directions, mode) if mode else None
    engine = Engine(module, optimizer, scheduler, max_grad_norm=1.0, direction_schedule=schedule, skip_nonfinite=False)
    loader = DataLoader(rows, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed), collate_fn=CachedFeatures.collate)
    losses: list[float] = []
    while engine.state.step < steps:
        engine.run(loader, steps, callbacks=[lambda out: losses.append(out.loss)])
    return losses


@torch.no_grad()
def evaluate(model, images: CachedFeatures, captions: list[CachedFeatures], batch_size: int = 500) -> dict:
    """Recall@K both ways and RSUM over VectorStores of the gallery side, multi-caption and pairwise protocols."""
    model.eval()
    tuner = model.base_model

    def run(features: CachedFeatures) -> dict[str, torch.Tensor]:
        parts = {"i2t": [], "t2i": [], "image": [], "text": []}
        for start in range(0, len(features), batch_size):
            batch = CachedFeatures.collate([features[i] for i in range(start, min(start + batch_size, len(features)))])
            out = tuner.connect(batch["image_tokens"], batch["image_mask"], batch["text_tokens"], batch["text_mask"])
            for key, value in (("i2t", out.vision_to_text.embeds), ("t2i", out.text_to_vision.embeds),
                               ("image", out.vision_target_embeds), ("text", out.text_target_embeds)):
                parts[key].append(value)
        return {k: torch.cat(v) for k, v in parts.items()}

    per_caption = [run(c) for c in captions]
    ids = images.tensors["image_ids"]
    image_store = VectorStore(per_caption[0]["image"], ids)
    text_store = VectorStore(torch.cat([p["text"] for p in per_caption]), ids.repeat(len(captions)))
    results = {}
    for protocol in ("multi_caption", "pairwise"):
        scores = retrieval_recall(image_store, text_store, image_queries=per_caption[0]["i2t"],
                                  text_queries=torch.cat([p["t2i"] for p in per_caption]), protocol=protocol)
        results[protocol] = scores
    model.train()
    return results


def time_steps(backbones, rows: Rows, batch_size: int, repeats: int, seed: int) -> dict[str, float]:
    """Median connector train-step time (ms), sparse vs dense dispatch, interleaved repetitions."""
    models, optimizers = {}, {}
    for dispatch in ("sparse", "dense"):
        models[dispatch] = build_model(backbones, AltMoEConfig(**BASE, dispatch=dispatch), seed)
        optimizers[dispatch] = torch.optim.AdamW([p for p in models[dispatch].parameters() if p.requires_grad])
    batch = CachedFeatures.collate([rows[i] for i in range(batch_size)])

    def step(dispatch: str):
        module, calls = FeatureConnector(models[dispatch]).train(), itertools.count()

        def call() -> None:  # the directions alternate, one per round
            with models[dispatch].base_model.direction(("text_to_vision", "vision_to_text")[next(calls) % 2]):
                module(**batch).loss.backward()
                optimizers[dispatch].step()
                optimizers[dispatch].zero_grad()
        return call

    times = time_rounds({d: step(d) for d in ("dense", "sparse")}, repeats, warmup=2)
    return {d: statistics.median(t * 1000 for t in times[d]) for d in ("sparse", "dense")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--timing-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="Keep the cached tower features here and reuse them (default: a temporary folder).")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "bench_altmoe.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    backbones = pretrained_backbones(seed=args.seed)
    task = load_task("synthetic:retrieval", train_size=args.train_size, eval_size=args.eval_size, seed=args.seed)
    captions = len(task.dataset["validation"][0]["captions"])
    collator_kwargs = dict(tokenizer=AutoTokenizer.from_pretrained(backbones.text),
                           image_processor=AutoImageProcessor.from_pretrained(backbones.vision),
                           task_type="retrieval", max_length=64)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.cache_dir / f"{backbones.vision.parent.name}-{args.train_size}-{args.eval_size}" \
            if args.cache_dir else Path(scratch)
        featurizer = build_model(backbones, AltMoEConfig(**BASE), args.seed)
        cache_began = time.perf_counter()
        train_parts = cache_split(featurizer, task, "train", collator_kwargs, folder, captions, 256)
        eval_parts = cache_split(featurizer, task, "validation", collator_kwargs, folder, captions, 256)
        cache_seconds = time.perf_counter() - cache_began
    rows = Rows(concat(train_parts))
    print(f"cached {len(rows)} training pairs and {len(eval_parts[0])} x {captions} evaluation pairs in "
          f"{cache_seconds:.1f} s", flush=True)
    results = {}
    for name in args.variants:
        kwargs, mode, fraction = VARIANTS[name]
        model = build_model(backbones, AltMoEConfig(**kwargs), args.seed)
        steps = int(args.steps * fraction)
        variant_began = time.perf_counter()
        losses = train(model, rows, mode, steps, args.batch_size, args.lr, args.seed) if steps else []
        seconds = time.perf_counter() - variant_began
        trainable, _ = model.get_nb_trainable_parameters()
        results[name] = {"steps": steps, "seconds": seconds, "params": trainable, **evaluate(model, eval_parts[0],
                                                                                             eval_parts)}
        if losses:
            results[name]["loss"] = statistics.mean(losses[-50:])
        scores = results[name]["multi_caption"]
        print(f"{name}: {steps} steps in {seconds:.0f} s, i2t R@1 {scores['i2t_r1']:.1f}, t2i R@1 "
              f"{scores['t2i_r1']:.1f}, RSUM {scores['rsum']:.1f}", flush=True)
    timing = time_steps(backbones, rows, args.batch_size, args.timing_repeats, args.seed)
    report = render(results, timing, args, captions, len(rows), time.perf_counter() - began)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    return 0


def render(results: dict, timing: dict, args, captions: int, train_pairs: int, elapsed: float) -> str:
    lines = ["# Alt-MoE on the offline caption <-> image benchmark",
             "",
             f"Command: `python benchmarks/bench_altmoe.py --steps {args.steps} --train-size {args.train_size} "
             f"--eval-size {args.eval_size} --batch-size {args.batch_size} --lr {args.lr} --threads {args.threads}`",
             "",
             f"Frozen tiny pretrained ViT + BERT (offline benchmark backbones); {train_pairs} cached training pairs "
             f"({args.train_size} images x {captions} captions); evaluation on {args.eval_size} held-out images x "
             f"{captions} captions. Connector: width {WIDTH}, top-{TOP_K} of {EXPERTS} experts, tau 0.03, alpha 0.5, "
             f"batch {args.batch_size}, AdamW lr {args.lr}. Recall in percent.",
             ""]
    for protocol, title in (("multi_caption", f"Multi-caption protocol ({captions} captions per image)"),
                            ("pairwise", "Pairwise protocol (first caption of each image)")):
        metrics = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
        lines += [f"## {title}", "",
                  *markdown_table(["variant", "trainable params", "steps", "I->T R@1", "R@5", "R@10", "T->I R@1",
                                   "R@5", "R@10", "RSUM"],
                                  [[name, f"{result['params']:,}", str(result["steps"]),
                                    *(f"{result[protocol][m]:.1f}" for m in metrics)]
                                   for name, result in results.items()], right=range(1, 10)),
                  ""]
    lines += ["## Connector training step (cached features, one direction, batch "
              f"{args.batch_size}, median of {args.timing_repeats})", "",
              *markdown_table(["expert dispatch", "ms / step", "ratio to dense"],
                              [[dispatch, f"{ms:.1f}", f"{ms / timing['dense']:.2f}"]
                               for dispatch, ms in timing.items()], right=(1, 2))]
    lines += ["", f"Environment: {environment(args.threads)}; total {elapsed / 60:.1f} min.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
