"""How a run is evaluated, and what its final evaluation draws, for each kind of method (``MethodHooks``): labelled
tasks (logits against labels; routing per class) and retrieval (Recall@K both ways over vector stores; Recall@K and
expert usage per direction)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..altmoe.config import DIRECTIONS
from ..altmoe.layer import BRANCHES
from ..metrics import compute_metrics
from ..plots import plot_class_usage, plot_direction_usage, plot_recall, plot_routing
from ..retrieval import VectorStore, retrieval_recall


@dataclass
class Evaluation:
    """One evaluation of a run: its metrics, the routing weights (sites, examples, experts; None when nothing routes)
    and the examples' labels (None for retrieval)."""

    metrics: dict[str, float]
    routing: np.ndarray | None = None
    labels: np.ndarray | None = None


@dataclass(frozen=True)
class PlotTarget:
    """Where a run's plots go and what their titles name."""

    folder: Path
    method: str
    dataset: str
    split: str
    label_names: list[str]


def label_metric(multi_label: bool) -> str:
    """The metric a labelled run keeps its best adapter by."""
    return "f1_micro" if multi_label else "accuracy"


def retrieval_metric(multi_label: bool) -> str:
    """The metric a retrieval run keeps its best adapter by: the sum of Recall@1/5/10 both ways."""
    return "rsum"


@torch.no_grad()
def evaluate_labels(model, loader, accelerator, model_inputs, multi_label: bool) -> Evaluation:
    """Metrics of the logits against the labels, the routing weights (blocks, examples, experts) and the labels."""
    logits, labels, routing = [], [], []
    for batch in loader:
        out = model(**model_inputs(batch))
        got_logits, got_labels = accelerator.gather_for_metrics((out.logits.float(), batch["labels"]))
        logits.append(got_logits.cpu())
        labels.append(got_labels.cpu())
        if isinstance(out.get("routing_weights"), torch.Tensor):
            routing.append(accelerator.gather_for_metrics(out.routing_weights.transpose(0, 1).float()).cpu())
    logits, labels = torch.cat(logits).numpy(), torch.cat(labels).numpy()
    routing_array = torch.cat(routing).transpose(0, 1).numpy() if routing else None
    return Evaluation(compute_metrics(logits, labels, multi_label), routing_array, labels)


@torch.no_grad()
def evaluate_retrieval(model, loader, accelerator, model_inputs, multi_label: bool) -> Evaluation:
    """Recall@1/5/10 in both directions and RSUM (one caption per image): each direction's queries search a vector
    store of the other modality's target embeddings. Routing: one site per direction and branch of the connector."""
    parts = []
    for batch in loader:
        out = model(**model_inputs(batch, return_loss=False))
        parts.append([t.float().cpu() for t in accelerator.gather_for_metrics(
            (out.vision_to_text.embeds, out.text_to_vision.embeds, out.vision_target_embeds, out.text_target_embeds,
             batch["image_ids"], out.routing_weights.transpose(0, 1)))])
    vision_queries, text_queries, vision_targets, text_targets, ids, routing = (torch.cat(c) for c in zip(*parts))
    ids = ids.long()
    metrics = retrieval_recall(VectorStore(vision_targets, ids), VectorStore(text_targets, ids),
                               image_queries=vision_queries, text_queries=text_queries)
    return Evaluation(metrics, routing.transpose(0, 1).numpy())


def routing_plots(model, evaluation: Evaluation, target: PlotTarget) -> dict[str, Path]:
    """MoPE: routing weights per routed block and class."""
    if evaluation.routing is None:
        return {}
    tower = getattr(next(iter(model.peft_config.values())), "prompted_tower", None)
    path = target.folder / "routing.png"
    return {"routing.png": plot_routing(evaluation.routing, evaluation.labels, target.label_names, path,
                                        title=f"{target.method} routing on {target.dataset}", tower=tower,
                                        split=target.split)}


def expert_usage_plots(model, evaluation: Evaluation, target: PlotTarget) -> dict[str, Path]:
    """S3: expert usage per class, averaged over the routing sites (the paper design's MoE layers of both towers)."""
    if evaluation.routing is None:
        return {}
    paper = next(iter(model.peft_config.values())).design == "paper"
    what = "MoE expert routing (both towers)" if paper else "concept (expert) usage"
    path = target.folder / "routing.png"
    return {"routing.png": plot_class_usage(evaluation.routing.mean(0), evaluation.labels, target.label_names, path,
                                            title=f"S3 {what} per class on {target.dataset}, {target.split} split")}


def retrieval_plots(model, evaluation: Evaluation, target: PlotTarget) -> dict[str, Path]:
    """Alt-MoE: Recall@K both ways, and expert usage per direction and branch of the connector."""
    plots = {"recall.png": plot_recall(evaluation.metrics, target.folder / "recall.png",
                                       title=f"{target.method} on {target.dataset}, {target.split} split")}
    routing = evaluation.routing
    if routing is not None:
        sites = [f"{d.replace('_to_', '→')} {b}" for d in DIRECTIONS for b in BRANCHES]
        sites = sites if len(sites) == len(routing) else [f"site {i}" for i in range(len(routing))]
        plots["expert_usage.png"] = plot_direction_usage(
            routing, sites, target.folder / "expert_usage.png",
            title=f"{target.method} expert usage per direction, {target.split} split")
    return plots
