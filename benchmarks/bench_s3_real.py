"""Benchmark S3's paper protocol on real pretrained towers and real images (fashion:entailment).

    python benchmarks/bench_s3_real.py                     # 3 seeds, chi in {2, 8}; ~13 min on 2 busy cores
    python benchmarks/bench_s3_real.py --skip-concepts     # without the concepts design's pruning sweep

The frozen towers are the first 4 blocks of CLIP ViT-B/16's image tower at 64 px (position embeddings interpolated)
and all-MiniLM-L6-v2 (``mmexperts.offline.real_towers``). They run once over ``load_task("fashion:entailment")``
(a Fashion-MNIST garment and a yes/no question about a garment attribute, balanced so that either modality alone is at
chance): each example's output tokens of the block S3 attaches to (the towers' last block) are kept in memory
(``--features-cache`` stores them between runs). S3 then trains on those tokens through a base model that replays
them (``CachedTokenModel``), with the protocol of ``bench_s3_stages.py`` (``training.sweep.three_stages``): stage
1, stage 2 (routers only) and a linear probe on ``fused_embeds`` at each keep ratio. Baselines on the towers'
mean-pooled tokens, concatenated: a linear probe and a small MLP (late fusion); the MLP also reads S3's
``fused_embeds`` at p = 1. Seeds vary the adapter, the batches and the probes; the data draw is the same
(``--data-seed``).
Results: stdout, ``benchmarks/results/bench_s3_real.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmexperts import FeatureEncoderConfig, FeatureEncoderForClassification, S3Config
from mmexperts.data.collate import MultimodalCollator
from mmexperts.data.loading import load_task
from mmexperts.offline.real_towers import real_towers
from mmexperts.plots import plot_keep_ratio_curves
from mmexperts.s3.protocol import keep_ratio_table, probe_features, summarize_keep_ratios
from mmexperts.towers import masked_mean
from mmexperts.training.sweep import SweepConfig, evaluate, fit, probe_accuracy, prune_and_finetune, three_stages

from harness import markdown_table, run_footer
from s3_protocol import named_rows

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CSV_FIELDS = ("seed", "model", "keep_ratio", "kept_pairs", "test_accuracy")
SPLITS = ("train", "validation", "test")
FROZEN_LINEAR, FROZEN_MLP = "frozen towers: linear probe", "frozen towers: MLP (late fusion)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--keep-ratios", default="0.1,0.2,0.3,0.4,0.6,0.8,1.0")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--vision-layers", type=int, default=4, help="CLIP image-tower blocks kept.")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--granularities", default="2,8", help="chi values: experts per token (top_k).")
    parser.add_argument("--expansion", type=int, default=2, help="rho: num_experts = chi * rho.")
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--stage1-epochs", type=int, default=10)
    parser.add_argument("--stage2-epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--mlp-hidden", type=int, default=256)
    parser.add_argument("--mlp-steps", type=int, default=500)
    parser.add_argument("--concept-epochs", type=int, default=15)
    parser.add_argument("--concept-sparsities", default="0,0.25,0.5,0.75")
    parser.add_argument("--skip-concepts", action="store_true", help="Skip the concepts design's pruning sweep.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (more thrash on a shared machine: keep 1 there).")
    parser.add_argument("--features-cache", default=None,
                        help="safetensors file for the encoded tokens: read if it exists, else written after encoding.")
    parser.add_argument("--output", default=str(RESULTS / "bench_s3_real"), help="Path stem of the result files.")
    return parser.parse_args(argv)


# ---- the frozen towers, run once ---------------------------------------------------------------------------------
@torch.no_grad()
def encode(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Per split: the vision tower's last-block tokens, the text tower's last-block tokens and mask (padded to the
    split's longest question) and the labels."""
    paths = real_towers()
    task = load_task("fashion:entailment", train_size=args.train_size, eval_size=args.eval_size, seed=args.data_seed)
    vision = AutoModel.from_pretrained(paths["vision"], num_hidden_layers=args.vision_layers).eval()
    text = AutoModel.from_pretrained(paths["text"]).eval()
    size = args.image_size
    processor = AutoImageProcessor.from_pretrained(paths["vision"], size={"shortest_edge": size},
                                                   crop_size={"height": size, "width": size})
    collator = MultimodalCollator(AutoTokenizer.from_pretrained(paths["text"]), processor, task.task_type,
                                  model_kwargs={"interpolate_pos_encoding": True})
    tensors = {}
    for split in SPLITS:
        parts = {"image": [], "text": [], "mask": [], "labels": []}
        for batch in DataLoader(task.dataset[split], batch_size=128, collate_fn=collator):
            parts["image"].append(vision(pixel_values=batch["pixel_values"],
                                         interpolate_pos_encoding=True).last_hidden_state)
            text_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            parts["text"].append(text(**text_inputs).last_hidden_state)
            parts["mask"].append(batch["attention_mask"])
            parts["labels"].append(batch["labels"])
        length = max(t.shape[1] for t in parts["text"])
        tensors[f"{split}.image"] = torch.cat(parts["image"]).contiguous()
        tensors[f"{split}.text"] = torch.cat([nn.functional.pad(t, (0, 0, 0, length - t.shape[1]))
                                              for t in parts["text"]]).contiguous()
        tensors[f"{split}.mask"] = torch.cat([nn.functional.pad(m, (0, length - m.shape[1])) for m in parts["mask"]])
        tensors[f"{split}.labels"] = torch.cat(parts["labels"])
    return tensors


def tower_tokens(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The encoded tokens, from ``--features-cache`` when it holds them."""
    cache = Path(args.features_cache) if args.features_cache else None
    if cache is not None and cache.is_file():
        return load_file(cache)
    tensors = encode(args)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, cache)
    return tensors


# ---- a base model that replays the cached tokens -------------------------------------------------------------------
class ReplayBlock(nn.Module):
    """The block S3 wraps: returns the cached tokens unchanged (times a frozen unit scale; the S3 layer reads its
    device from the wrapped block's parameters)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return hidden_states * self.scale


class CachedTokenTower(nn.Module):
    """One frozen tower replayed from its cached output tokens; its summary is the mean over real tokens."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden_size)
        self.layers = nn.ModuleList([ReplayBlock()])

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None):
        mask = torch.ones(features.shape[:2], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        hidden = self.layers[0](features, mask)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=masked_mean(hidden, mask))


class CachedTokenModel(FeatureEncoderForClassification):
    """``FeatureEncoderForClassification`` whose towers replay cached token features (``features_a``: vision,
    ``features_b``: text) of their own widths; its pooled outputs are the towers' mean tokens."""

    def __init__(self, vision_size: int, text_size: int, num_labels: int):
        super().__init__(FeatureEncoderConfig(feature_size_a=vision_size, feature_size_b=text_size, hidden_size=8,
                                              num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                                              num_labels=num_labels))
        self.modality_a_model = CachedTokenTower(vision_size)
        self.modality_b_model = CachedTokenTower(text_size)
        self.classifier = nn.Linear(vision_size + text_size, num_labels)


def loader(tensors: dict, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of the base model's inputs and labels from one split of the cached tokens."""
    rows = tensors[f"{split}.labels"].shape[0]

    def collate(index):
        index = torch.as_tensor(index)
        text_mask = tensors[f"{split}.mask"][index]
        length = int(text_mask.sum(1).max())
        return {"features_a": tensors[f"{split}.image"][index], "features_b": tensors[f"{split}.text"][index, :length],
                "attention_mask_b": text_mask[:, :length], "labels": tensors[f"{split}.labels"][index]}

    return DataLoader(range(rows), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed), collate_fn=collate)


def mlp_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, seed: int,
              hidden: int, steps: int) -> float:
    """Test accuracy of a one-hidden-layer MLP on standardised features (full-batch AdamW, dropout 0.2)."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(train_x.shape[1], hidden), nn.GELU(), nn.Dropout(0.2),
                         nn.Linear(hidden, int(train_y.max()) + 1))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    head.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        return float((head(test_x).argmax(-1) == test_y).float().mean())


def row(seed: int, model: str, accuracy: float, keep_ratio: float = 1.0) -> dict:
    return {"seed": seed, "model": model, "keep_ratio": keep_ratio, "kept_pairs": 1.0, "test_accuracy": accuracy}


def base_model(tensors: dict, seed: int) -> CachedTokenModel:
    torch.manual_seed(seed)
    return CachedTokenModel(tensors["train.image"].shape[-1], tensors["train.text"].shape[-1],
                            int(tensors["train.labels"].max()) + 1)


def run_seed(args: argparse.Namespace, tensors: dict, seed: int, ratios: list[float]) -> list[dict]:
    train = loader(tensors, "train", args.batch_size, shuffle=True, seed=seed)
    train_eval, test = loader(tensors, "train", args.eval_batch_size), loader(tensors, "test", args.eval_batch_size)
    rows = []
    for chi in [int(g) for g in args.granularities.split(",")]:
        config = S3Config.from_granularity(chi, args.expansion, latent_size=args.latent_size,
                                           num_layers=args.num_layers, dispatch="dense")
        model = peft.get_peft_model(base_model(tensors, seed), config)
        if not rows:  # the frozen towers' baselines, on their mean-pooled tokens concatenated
            rows.append(row(seed, FROZEN_LINEAR, probe_accuracy(model, train_eval, test, seed, adapter=False)[0]))
            train_x, train_y, _ = probe_features(model, train_eval, adapter=False)
            test_x, test_y, _ = probe_features(model, test, adapter=False)
            rows.append(row(seed, FROZEN_MLP, mlp_probe(train_x, train_y, test_x, test_y, seed, args.mlp_hidden,
                                                        args.mlp_steps)))
        stages = three_stages(model, train, train_eval, test, seed, ratios, args.stage1_epochs, args.stage2_epochs,
                              args.learning_rate)
        rows += named_rows(stages, seed, f"chi={chi}")
        train_x, train_y, _ = probe_features(model, train_eval)
        test_x, test_y, _ = probe_features(model, test)
        rows.append(row(seed, f"chi={chi}: S3 fused_embeds, MLP probe",
                        mlp_probe(train_x, train_y, test_x, test_y, seed, args.mlp_hidden, args.mlp_steps)))
    return rows


def concept_sweep(args: argparse.Namespace, tensors: dict, seed: int) -> list[dict]:
    """The concepts design on the same tokens (its own protocol: supervised heads, gate-mass pruning of whole experts
    by validation utility, router + head fine-tune); test accuracy per sparsity."""
    config = SweepConfig(epochs=args.concept_epochs, finetune_epochs=3, criterion="gate_mass",
                         pruning_schedule="one-shot", learning_rate=args.learning_rate, num_experts=8,
                         latent_size=args.latent_size)
    torch.manual_seed(seed)
    model = peft.get_peft_model(base_model(tensors, seed), S3Config(
        design="concepts", num_experts=config.num_experts, latent_size=config.latent_size,
        sharpness_loss_weight=config.sharpness_loss_weight, ssl_loss_weight=0.0))
    train = loader(tensors, "train", args.batch_size, shuffle=True, seed=seed)
    validation, test = list(loader(tensors, "validation", args.eval_batch_size)), loader(tensors, "test", 256)
    fit(model, train, config.epochs, config.learning_rate, config.weight_decay)
    trained = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    rows = []
    for sparsity in [float(s) for s in args.concept_sparsities.split(",")]:
        peft.set_peft_model_state_dict(model, trained)
        prune_and_finetune(model, sparsity, validation, train, config)
        rows.append({"seed": seed, "model": "concepts design", "keep_ratio": 1.0 - sparsity, "kept_pairs": 1.0,
                     "test_accuracy": float(evaluate(model, test)["accuracy"])})
    return rows


def markdown(args, summary: list[dict], seconds: float, command: str, encode_seconds: float) -> str:
    cell = {(row["model"], row["keep_ratio"]): row for row in summary}
    models = [m for m in dict.fromkeys(row["model"] for row in summary)
              if ": S3 (three stages)" in m or ": specialization only" in m]
    seeds = len(args.seeds.split(","))
    lines = [f"# S3 on real towers: fashion:entailment, CLIP ViT-B/16 (first {args.vision_layers} blocks, "
             f"{args.image_size} px) + all-MiniLM-L6-v2 ({seeds} seeds)", "", f"`{command}`", "",
             f"Train {args.train_size}, test {args.eval_size} (data seed {args.data_seed}); towers frozen, encoded "
             f"once ({encode_seconds:.0f} s). chi in {{{args.granularities}}}, rho={args.expansion}, "
             f"d={args.latent_size}, {args.num_layers} MoE layer(s) per modality; stage 1 {args.stage1_epochs} epochs, "
             f"stage 2 {args.stage2_epochs} epochs (routers only); linear probe on `fused_embeds`; eval batches of "
             f"{args.eval_batch_size}. Chance: 0.5.", "", *keep_ratio_table(summary, models), "",
             *markdown_table(["baseline or probe", "test accuracy"],
                             [[model, f"{cell[(model, 1.0)]['mean']:.4f} ± {cell[(model, 1.0)]['std']:.4f}"]
                              for model in dict.fromkeys(row["model"] for row in summary)
                              if model not in models and model != "concepts design"])]
    concepts = [row for row in summary if row["model"] == "concepts design"]
    if concepts:
        lines += ["", "Concepts design (`design=\"concepts\"`) on the same tokens: supervised heads "
                  f"{args.concept_epochs} epochs, one-shot gate-mass pruning by validation utility, 3 router + head "
                  "fine-tune epochs; test accuracy of its own head:", "",
                  *markdown_table(["experts pruned", "test accuracy"],
                                  [[f"{1 - r['keep_ratio']:.2f}", f"{r['mean']:.4f} ± {r['std']:.4f}"]
                                   for r in reversed(concepts)])]
    lines += ["", run_footer(seconds, HERE)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/bench_s3_real.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ratios = [float(r) for r in args.keep_ratios.split(",")]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tensors = tower_tokens(args)
    encode_seconds = time.perf_counter() - start
    print(f"tower tokens ready ({encode_seconds:.0f} s)", flush=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows += run_seed(args, tensors, seed, ratios)
        if not args.skip_concepts:
            rows += concept_sweep(args, tensors, seed)
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    summary = summarize_keep_ratios(rows)
    stem = Path(args.output)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    shown = [r for r in summary if r["model"] != "concepts design" and "MLP probe" not in r["model"]]
    plot_keep_ratio_curves(shown, stem.with_suffix(".png"), "S3 (paper design) on real towers, fashion:entailment",
                           chance=0.5)
    text = markdown(args, summary, time.perf_counter() - start, command.strip(), encode_seconds)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem.with_suffix('.csv')}, {stem.with_suffix('.png')}, {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
