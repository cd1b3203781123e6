"""Load a multimodal task (synthetic, local folder or Hugging Face Hub) into standard columns, dropping bad rows.

``load_task`` sends a task name to its source: ``data.builtin`` (the offline kit's generators, Fashion-MNIST,
MultiBench), ``data.local`` (a folder of images and rows files) or ``data.hub`` (a Hub dataset). The standard columns
are described in ``data.tasks``, the local folder format in ``data.local``, the bad-row checks in ``data.checks`` and
``data.rows``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..offline.synthetic import TASKS as SYNTHETIC_TASKS
from .builtin import FACTOR_TASK, FASHION_PREFIX, MULTIBENCH_PREFIX, _load_fashion, _load_feature_task, _load_synthetic
from .catalog import KNOWN_DATASETS
from .fashion import TASKS as FASHION_TASKS
from .hub import _load_hub_dataset, _prepare_hub
from .local import _load_local
from .tasks import TaskData


def load_task(name: str, *, data_dir: str | None = None, train_size: int = 2000, eval_size: int = 500, seed: int = 0,
              image_size: int = 32, strict: bool = False, max_rows: int | None = None, **hub_kwargs) -> TaskData:
    """Load a task by name into standard columns (see ``data.tasks``), dropping and counting bad rows.

    ``name`` is ``"synthetic:<entailment|multilabel|retrieval|factors>"``, ``"multibench:<name>"`` (a MultiBench
    pickle in ``data_dir``, see ``load_multibench``), ``"fashion:<entailment|retrieval>"`` (real Fashion-MNIST
    images, see ``data.fashion``; ``data_dir`` optionally names the folder of its IDX files), a known benchmark
    (``KNOWN_DATASETS``: ``snli-ve``, ``mm-imdb``, ``food101``, ``coco``, ``flickr30k``), ``"local"`` or a folder
    path (read from ``data_dir`` / that folder), or any ``"owner/name"`` Hub id, whose columns are detected. When
    ``data_dir`` is given it is always read as a local folder, also for a known benchmark name (its task type is then
    checked). ``train_size``, ``eval_size`` and ``seed`` shape the synthetic and Fashion-MNIST tasks, ``image_size``
    the synthetic ones only. ``max_rows`` keeps the first rows of the train split, before bad rows are dropped
    (malformed lines of local files are left out first). Other keyword arguments go to ``datasets.load_dataset`` for
    Hub datasets, to ``build_synthetic_splits`` (``max_objects``, ``captions_per_image``) for synthetic tasks, to
    ``build_factor_dataset`` or to ``load_multibench``. Synthetic data is generated valid and is not checked.
    """
    if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows <= 0):
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}")
    if name == FACTOR_TASK or name.startswith(MULTIBENCH_PREFIX):
        return _load_feature_task(name, data_dir, train_size, eval_size, seed, max_rows, hub_kwargs)
    if name.startswith("synthetic:"):
        return _load_synthetic(name, train_size, eval_size, seed, image_size, max_rows, hub_kwargs)
    if name.startswith(FASHION_PREFIX):
        return _load_fashion(name, data_dir, train_size, eval_size, seed, max_rows)
    spec = KNOWN_DATASETS.get(name.lower())
    if name == "local" or data_dir is not None or os.path.isdir(name):
        folder = data_dir if data_dir is not None else (None if name == "local" else name)
        if folder is None:
            raise ValueError("load_task('local') needs data_dir: a folder with images and train.jsonl / "
                             "validation.jsonl / test.jsonl (or .csv).")
        return _load_local(name, Path(folder), strict, max_rows, spec)
    if spec is not None:
        if spec.hub_id is None:
            raise ValueError(f"{name!r} must be loaded from a local copy: pass data_dir=<folder>. {spec.description} "
                             "The folder holds the images and train.jsonl / validation.jsonl / test.jsonl (or .csv) "
                             "rows with 'image' (path relative to the folder), 'text' and 'label' or 'labels'.")
        raw = _load_hub_dataset(spec.hub_id, name, hub_kwargs)
        return _prepare_hub(name, raw, spec, strict, max_rows)
    if "/" in name:
        raw = _load_hub_dataset(name, name, hub_kwargs)
        return _prepare_hub(name, raw, None, strict, max_rows)
    raise ValueError(f"unknown dataset {name!r}; valid choices: "
                     + ", ".join([f"synthetic:{t}" for t in SYNTHETIC_TASKS] + [FACTOR_TASK, "multibench:<name>"]
                                 + [f"{FASHION_PREFIX}{t}" for t in FASHION_TASKS]
                                 + sorted(KNOWN_DATASETS))
                     + ", 'local' (with data_dir), a folder path, or an 'owner/name' Hub dataset id")


__all__ = ["load_task"]
