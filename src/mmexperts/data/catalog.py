"""The known benchmarks (``KNOWN_DATASETS``): where each lives on the Hub (or that it is read from a local export)
and which of its columns hold the image, text and label."""

from __future__ import annotations

from dataclasses import dataclass

from .tasks import MULTI_LABEL, RETRIEVAL, SINGLE_LABEL


@dataclass(frozen=True)
class HubDatasetSpec:
    """Where a known benchmark lives on the Hub and which of its columns hold the image, text and label."""

    hub_id: str | None
    task_type: str
    image_column: str = "image"
    text_column: str | None = None
    label_column: str | None = None
    label_names: tuple[str, ...] | None = None
    id_column: str | None = None
    description: str = ""


KNOWN_DATASETS: dict[str, HubDatasetSpec] = {
    "snli-ve": HubDatasetSpec(
        "Dec2Enc/e-snli-ve", SINGLE_LABEL, "image", "hypothesis", "label",
        ("entailment", "neutral", "contradiction"),
        description="e-SNLI-VE (corrected SNLI-VE): Flickr30k image, hypothesis, entailment/neutral/contradiction."),
    "mm-imdb": HubDatasetSpec(
        None, MULTI_LABEL,
        description="MM-IMDb (Arevalo et al., 2017): movie poster + plot, multi-label genres. It has no maintained "
                    "copy on the Hub with images: export it to data_dir with rows {image, text, labels: [genres]} "
                    "and a labels.txt of the 23 genres."),
    "food101": HubDatasetSpec(
        None, SINGLE_LABEL,
        description="UPMC Food-101 (Wang et al., 2015): food photo + recipe web page text, 101 classes. It has no "
                    "maintained copy on the Hub with texts (ethz/food101 holds images only): export it to data_dir "
                    "with rows {image, text, label: class name}."),
    "coco": HubDatasetSpec(
        "lmms-lab/COCO-Caption2017", RETRIEVAL, "image", "answer", id_column="id",
        description="COCO 2017 captions (5 per image) for caption <-> image retrieval."),
    "flickr30k": HubDatasetSpec(
        "lmms-lab/flickr30k", RETRIEVAL, "image", "caption", id_column="img_id",
        description="Flickr30k (5 captions per image, one 'test' split of 31,783 images) for retrieval."),
}

__all__ = ["KNOWN_DATASETS", "HubDatasetSpec"]
