"""Hub datasets: ``datasets.load_dataset`` with errors that say what to do offline, and the columns of a known
benchmark (``data.catalog``) or, for any other dataset, detected from its features."""

from __future__ import annotations

import os

import datasets

from .catalog import HubDatasetSpec
from .checks import (
    CAPTION_COLUMNS,
    IMAGE_ID_COLUMNS,
    LABEL_COLUMNS,
    TEXT_COLUMNS,
    _Columns,
    _describe_columns,
    _is_integer,
    _is_string,
    _is_string_list,
    _list_inner,
    _pick,
    _prepare,
)
from .tasks import MULTI_LABEL, RETRIEVAL, SINGLE_LABEL, SPLIT_ALIASES, TaskData


def _hub_offline() -> bool:
    flags = [os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", "")]
    if any(flag.strip().upper() in ("1", "ON", "YES", "TRUE") for flag in flags):
        return True
    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def _load_hub_dataset(hub_id: str, name: str, kwargs: dict) -> datasets.DatasetDict:
    """``datasets.load_dataset`` with errors that say what to do when the Hub cannot be reached."""
    if kwargs.get("streaming"):
        raise ValueError("streaming datasets are not supported: bad-row checks and DataLoader shuffling need a "
                         "map-style dataset; use split slicing (split='train[:10000]') to load less")
    local_help = ("or pass data_dir=<folder> with a local copy (images plus train.jsonl / validation.jsonl / "
                  "test.jsonl or .csv rows with 'image', 'text' and 'label' or 'labels').")
    which = f"{hub_id!r}" + (f" (for {name!r})" if name != hub_id else "")
    try:
        loaded = datasets.load_dataset(hub_id, **kwargs)
    except datasets.exceptions.DatasetNotFoundError as exc:
        if _hub_offline():
            raise ConnectionError(f"cannot load dataset {which}: offline mode is on (HF_HUB_OFFLINE=1) and it is "
                                  f"not in the local cache. Download it once with network access, "
                                  + local_help) from exc
        raise ValueError(f"dataset {which} was not found on the Hugging Face Hub (check the id, or log in for a "
                         f"gated dataset), " + local_help) from exc
    except (ConnectionError, TimeoutError, OSError) as exc:
        if _hub_offline():
            raise ConnectionError(f"cannot load dataset {which}: offline mode is on (HF_HUB_OFFLINE=1) and it is "
                                  f"not in the local cache. Unset HF_HUB_OFFLINE on a machine with network access "
                                  f"to download it once, " + local_help) from exc
        raise ConnectionError(f"cannot load dataset {which} from the Hugging Face Hub: the network or the Hub is "
                              f"unreachable ({type(exc).__name__}: {exc}). Retry with network access, "
                              + local_help) from exc
    if isinstance(loaded, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise ValueError("streaming datasets are not supported")
    if isinstance(loaded, datasets.Dataset):
        split = str(kwargs.get("split", "train")).split("[")[0].split("+")[0]
        loaded = datasets.DatasetDict({split: loaded})
    return datasets.DatasetDict({SPLIT_ALIASES.get(split, split): ds for split, ds in loaded.items()})


def _prepare_hub(name: str, raw: datasets.DatasetDict, spec: HubDatasetSpec | None, strict: bool,
                 max_rows: int | None) -> TaskData:
    first = raw[next(iter(raw))]
    features = first.features
    columns = first.column_names
    if spec is not None:
        image_column, text_column = spec.image_column, spec.text_column
        label_column, id_column = spec.label_column, spec.id_column
        wanted = {"image": image_column, "text": text_column, "label": label_column, "id": id_column}
        missing = {role: col for role, col in wanted.items() if col is not None and col not in columns}
        if missing:
            raise ValueError(f"{name!r} ({spec.hub_id}) lacks the expected column(s) "
                             f"{', '.join(f'{c!r} ({r})' for r, c in missing.items())}; {_describe_columns(raw)}")
        task_type = spec.task_type
    else:
        image_column = next((c for c in columns if isinstance(features[c], datasets.Image)), None)
        if image_column is None:
            raise ValueError(f"{name!r} has no datasets.Image column; {_describe_columns(raw)}")
        label_column = _pick(columns, LABEL_COLUMNS)
        text_column = next((c for c in TEXT_COLUMNS if c in columns and _is_string(features[c])), None)
        if label_column is None:
            text_column = next((c for c in TEXT_COLUMNS + CAPTION_COLUMNS
                                if c in columns and _is_string_list(features[c])), text_column)
        if text_column is None:
            raise ValueError(f"{name!r} has no text column (a string column named one of "
                             f"{', '.join(TEXT_COLUMNS)}); {_describe_columns(raw)}")
        if label_column is None:
            if not _is_string_list(features[text_column]):
                raise ValueError(f"{name!r} has no label column ('label' or 'labels') and no list-of-captions "
                                 f"column for retrieval; {_describe_columns(raw)}")
            task_type = RETRIEVAL
        else:
            task_type = MULTI_LABEL if _list_inner(features[label_column]) is not None else SINGLE_LABEL
        id_column = _pick(columns, IMAGE_ID_COLUMNS) if task_type == RETRIEVAL else None
    label_names = None
    if label_column is not None:
        label_feature = features[label_column]
        inner = _list_inner(label_feature)
        class_label = label_feature if isinstance(label_feature, datasets.ClassLabel) else inner
        if isinstance(class_label, datasets.ClassLabel):
            label_names = list(class_label.names)
        elif spec is not None and spec.label_names:
            label_names = list(spec.label_names)
    if id_column is not None and not _is_integer(features[id_column]):
        id_column = None  # non-numeric ids (file names, strings) are replaced by running row numbers
    columns_spec = _Columns(image_column, text_column, label_column, id_column)
    return _prepare(name, raw, columns_spec, task_type, label_names, strict, max_rows, base_dir=None)

