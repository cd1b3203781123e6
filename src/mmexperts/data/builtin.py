"""Tasks whose rows this package builds itself, valid by construction and not checked: the offline kit's synthetic
scenes and factor data, Fashion-MNIST (``data.fashion``) and MultiBench's feature pickles (``data.multibench``)."""

from __future__ import annotations

import datasets

from ..offline.factors import build_factor_dataset
from ..offline.synthetic import MULTILABEL_NAMES, build_synthetic_splits
from ..offline.synthetic import TASKS as SYNTHETIC_TASKS
from .fashion import build_fashion_splits
from .multibench import load_multibench
from .tasks import MULTI_LABEL, RETRIEVAL, SINGLE_LABEL, DataReport, TaskData

_SYNTHETIC_TASK_TYPES = {"entailment": SINGLE_LABEL, "multilabel": MULTI_LABEL, "retrieval": RETRIEVAL}
FACTOR_TASK = "synthetic:factors"
FASHION_PREFIX = "fashion:"
MULTIBENCH_PREFIX = "multibench:"


def _load_synthetic(name: str, train_size: int, eval_size: int, seed: int, image_size: int, max_rows: int | None,
                    kwargs: dict) -> TaskData:
    task = name.split(":", 1)[1]
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; valid choices: "
                         + ", ".join(f"synthetic:{t}" for t in SYNTHETIC_TASKS))
    splits = build_synthetic_splits(task, train_size, eval_size, seed=seed, image_size=image_size, **kwargs)
    splits = datasets.DatasetDict({split: ds.cast_column("image", datasets.Image(mode="RGB"))
                                   for split, ds in splits.items()})
    if max_rows is not None and len(splits["train"]) > max_rows:
        splits["train"] = splits["train"].select(range(max_rows))
    task_type = _SYNTHETIC_TASK_TYPES[task]
    features = splits["train"].features
    if task_type == SINGLE_LABEL:
        label_names = list(features["label"].names)
    elif task_type == MULTI_LABEL:
        label_names = list(MULTILABEL_NAMES)
    else:
        label_names = []
    report = DataReport()
    for split in splits:
        report.add(split, ())
    return TaskData(splits, task_type, label_names, name, report)


def _load_fashion(name: str, data_dir: str | None, train_size: int, eval_size: int, seed: int,
                  max_rows: int | None) -> TaskData:
    """Fashion-MNIST's real images with garment questions or captions (see ``data.fashion``); ``data_dir``: the
    folder of its IDX files (default: where Debian's ``dataset-fashion-mnist`` puts them)."""
    task = name[len(FASHION_PREFIX):]
    splits = build_fashion_splits(task, train_size, eval_size, seed=seed, data_dir=data_dir)
    if max_rows is not None and len(splits["train"]) > max_rows:
        splits["train"] = splits["train"].select(range(max_rows))
    report = DataReport()
    for split in splits:
        report.add(split, ())
    task_type = RETRIEVAL if task == "retrieval" else SINGLE_LABEL
    label_names = [] if task_type == RETRIEVAL else list(splits["train"].features["label"].names)
    return TaskData(splits, task_type, label_names, name, report)


def _load_feature_task(name: str, data_dir: str | None, train_size: int, eval_size: int, seed: int,
                       max_rows: int | None, kwargs: dict) -> TaskData:
    """The factor generator (``eval_size`` rows in validation and test) or a MultiBench pickle from ``data_dir``;
    extra keyword arguments go to ``build_factor_dataset`` or ``load_multibench``."""
    if name == FACTOR_TASK:
        splits = build_factor_dataset(num_train=train_size, num_validation=eval_size, num_test=eval_size, seed=seed,
                                      **kwargs)
    elif data_dir is None:
        raise ValueError(f"{name!r} reads MultiBench's feature pickle from disk: pass data_dir=<its folder or file>")
    else:
        splits = load_multibench(name[len(MULTIBENCH_PREFIX):], data_dir, **kwargs)
    if max_rows is not None and len(splits["train"]) > max_rows:
        splits["train"] = splits["train"].select(range(max_rows))
    report = DataReport()
    for split in splits:
        report.add(split, ())
    return TaskData(splits, SINGLE_LABEL, list(splits["train"].features["label"].names), name, report)

