"""MultiBench's pre-extracted feature pickles (MOSI, MOSEI, MUStARD, UR-FUNNY, MIMIC) as two-modality datasets.

Returns the same columns as ``build_factor_dataset``: ``modality_a`` and ``modality_b`` (float32 ``Array2D``
[seq_len, dim]) and ``label`` (``ClassLabel``), in ``train``/``validation``/``test`` splits, with a JSON record of
the source and preprocessing in every split's ``DatasetInfo.description``.

Preprocessing follows MultiBench's loaders (``datasets/affect/get_data.py``, ``datasets/mimic/get_data.py``):

* affect: non-finite values become 0 (MultiBench zeroes the audio's -inf); samples whose text is all zeros are
  dropped; with ``aligned`` every modality is cropped from the first non-zero text step (else each from its own
  first non-zero step); ``z_norm`` standardises each sample's features over time; sequences are truncated or
  zero-padded at the end to ``max_seq_len`` (default 50). Labels as MultiBench's ``task="classification"``:
  MOSI/MOSEI sentiment and MUStARD ``> 0`` is positive (a neutral 0 is negative), UR-FUNNY's 0/1 as given.
* MIMIC (``im.pk``): non-finite values become 0; static features (``[1, 5]``) and the 24-step time series
  (``[24, 12]``) are z-scored over the whole file; ``mimic_task=-1`` is the 6-class mortality label (class j = the
  first positive column j in 1..5 of ``adm_labels_all``, else 0), ``0..19`` the binary ICD-9 group ``y_icd9[:, task]``;
  the split is MultiBench's: ``random.seed(10)`` shuffle, validation the first 10 %, test the next 10 %, train the rest.

Pickle files can run arbitrary code when loaded. Only local files are read (URLs are refused), and by default
through an unpickler that admits numpy arrays and plain containers only; ``trust_pickle=True`` lifts that for a
file you trust.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from ..errors import UnsafePickleError
from ..offline.factors import arrays_to_dataset

AFFECT_MODALITIES: tuple[str, ...] = ("vision", "audio", "text")
AFFECT_SPLITS: dict[str, str] = {"train": "train", "validation": "valid", "test": "test"}
DEFAULT_MAX_SEQ_LEN = 50


@dataclass(frozen=True)
class MultiBenchSpec:
    """A MultiBench dataset: its pickle file names (first found wins), modalities, label names and label rule."""

    files: tuple[str, ...]
    modalities: tuple[str, ...]
    default_modalities: tuple[str, str]
    label_names: tuple[str, ...]
    label_rule: str


_BINARY = ("negative", "positive")
MULTIBENCH_DATASETS: dict[str, MultiBenchSpec] = {
    "mosi": MultiBenchSpec(("mosi_raw.pkl", "mosi_data.pkl"), AFFECT_MODALITIES, ("vision", "text"), _BINARY,
                           "sentiment > 0"),
    "mosei": MultiBenchSpec(("mosei_raw.pkl", "mosei_senti_data.pkl"), AFFECT_MODALITIES, ("vision", "text"),
                            _BINARY, "sentiment > 0"),
    "sarcasm": MultiBenchSpec(("sarcasm.pkl",), AFFECT_MODALITIES, ("vision", "text"),
                              ("not_sarcastic", "sarcastic"), "label > 0"),
    "humor": MultiBenchSpec(("humor.pkl",), AFFECT_MODALITIES, ("vision", "text"), ("not_humorous", "humorous"),
                            "label 0/1 as given"),
    "mimic": MultiBenchSpec(("im.pk", "im.pkl"), ("static", "timeseries"), ("static", "timeseries"),
                            tuple(str(i) for i in range(6)), "mortality class (mimic_task=-1) or ICD-9 group"),
}
MULTIBENCH_ALIASES: dict[str, str] = {"mustard": "sarcasm", "ur-funny": "humor", "urfunny": "humor",
                                      "cmu-mosi": "mosi", "cmu-mosei": "mosei"}
_SAFE_GLOBALS = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct",
                                                                                               "scalar")}
_SAFE_GLOBALS |= {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
_SAFE_GLOBALS |= {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy", "str_"), ("numpy", "bytes_"),
                  ("collections", "OrderedDict"), ("_codecs", "encode")}  # protocol 2 stores bytes via encode
# numpy >= 1.25 pickles dtypes by their class in numpy.dtypes: the exact class names, never a dotted path
_SAFE_GLOBALS |= {("numpy.dtypes", name) for name in dir(np.dtypes)
                  if isinstance(getattr(np.dtypes, name), type) and issubclass(getattr(np.dtypes, name), np.dtype)}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, scalars and plain containers; refuses any other class or function.

    Only exact ``(module, name)`` pairs of an allow-list are resolved: protocol 4 lets a pickle ask for a dotted
    name (``numpy.dtypes`` then ``__builtins__.eval``), which an allow-list of modules would follow.
    """

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"The pickle asks for {module}.{name}, which is not a numpy array, dtype or plain "
                                "container, so it was not loaded (pickles can run code). If you trust this file, "
                                "pass trust_pickle=True.")


def _find_file(name: str, spec: MultiBenchSpec, data_dir: str | Path) -> Path:
    if "://" in str(data_dir):
        raise ValueError(f"data_dir must be a local folder or file, got the URL {str(data_dir)!r}: pickles can run "
                         "code, so download the file yourself from the MultiBench README's links, check its origin, "
                         "and pass its local path")
    path = Path(data_dir).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"data_dir {str(path)!r} does not exist; pass the folder holding "
                                f"{' or '.join(spec.files)} for {name!r}, or the file itself")
    for file in spec.files:
        if (path / file).is_file():
            return path / file
    listing = ", ".join(sorted(p.name for p in path.iterdir())[:20]) or "nothing"
    raise FileNotFoundError(f"no {' or '.join(spec.files)} for {name!r} in {str(path)!r} (found {listing}); pass "
                            "the pickle's path as data_dir if it has another name")


def _read_pickle(path: Path, trust_pickle: bool) -> dict:
    with open(path, "rb") as f:
        data = pickle.load(f) if trust_pickle else _ArrayUnpickler(f).load()
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a {type(data).__name__}, expected MultiBench's dict of splits/arrays")
    return data


def _require(data: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{where} lacks {missing}; it has {sorted(map(str, data))}. Is this the right MultiBench "
                         "file?")


def _crop(x: np.ndarray, starts: np.ndarray, length: int, z_norm: bool = False) -> np.ndarray:
    """Each sample's steps from its start (standardised per feature over them with ``z_norm``), truncated or
    zero-padded at the end to ``length``."""
    out = np.zeros((len(x), length, x.shape[2]), np.float32)
    for i, start in enumerate(starts):
        steps = x[i, start:]
        if z_norm:  # unbiased std as torch.std; constant features and single steps become 0
            std = steps.std(0, ddof=1) if len(steps) > 1 else np.zeros(steps.shape[1], steps.dtype)
            steps = (steps - steps.mean(0)) / np.where(std > 0, std, np.inf)
        steps = steps[:length]
        out[i, :len(steps)] = steps
    return out


def _first_nonzero_step(x: np.ndarray) -> np.ndarray:
    return np.argmax(np.any(x != 0, axis=2), axis=1)


def _affect_split(name: str, raw: dict, modalities: tuple[str, str], max_seq_len: int, aligned: bool,
                  z_norm: bool) -> tuple[dict, int]:
    arrays = {m: np.nan_to_num(np.asarray(raw[m], np.float32), nan=0.0, posinf=0.0, neginf=0.0)
              for m in set(modalities) | {"text"}}
    labels = np.asarray(raw["labels"], np.float64).reshape(len(arrays["text"]), -1)[:, 0]
    keep = np.any(arrays["text"] != 0, axis=(1, 2))
    arrays = {m: x[keep] for m, x in arrays.items()}
    labels = labels[keep]
    text_start = _first_nonzero_step(arrays["text"])
    row = {}
    for column, m in zip(("modality_a", "modality_b"), modalities):
        starts = text_start if aligned else _first_nonzero_step(arrays[m])
        row[column] = _crop(arrays[m], starts, max_seq_len, z_norm)
    if name == "humor":
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"humor labels must be 0 or 1, found {sorted(set(labels.tolist()) - {0.0, 1.0})[:5]}")
        row["label"] = labels.astype(np.int64)
    else:
        row["label"] = (labels > 0).astype(np.int64)
    return row, int((~keep).sum())


def _mimic_splits(data: dict, modalities: tuple[str, str], max_seq_len: int | None,
                  mimic_task: int) -> dict[str, dict]:
    _require(data, ("ep_tdata", "adm_features_all", "adm_labels_all", "y_icd9"), "the MIMIC pickle")
    values = {"static": np.asarray(data["adm_features_all"], np.float64)[:, None, :],
              "timeseries": np.asarray(data["ep_tdata"], np.float64)}
    for m, x in values.items():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        mean, std = x.mean(axis=(0, 1)), x.std(axis=(0, 1))
        values[m] = ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    icd9 = np.asarray(data["y_icd9"])
    if not isinstance(mimic_task, int) or not -1 <= mimic_task < icd9.shape[1]:
        raise ValueError(f"mimic_task must be -1 (mortality) or an ICD-9 group index 0..{icd9.shape[1] - 1}, "
                         f"got {mimic_task!r}")
    if mimic_task < 0:
        positive = np.asarray(data["adm_labels_all"])[:, 1:6] > 0
        labels = np.where(positive.any(1), positive.argmax(1) + 1, 0)
    else:
        labels = icd9[:, mimic_task]
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"y_icd9[:, {mimic_task}] must hold 0/1 labels, found "
                             f"{sorted(set(labels.tolist()) - {0, 1})[:5]}")
        labels = labels.astype(np.int64)
    order = list(range(len(labels)))
    random.Random(10).shuffle(order)  # the permutation of MultiBench's random.seed(10); random.shuffle(...)
    n = len(order)
    parts = {"train": order[n // 5:], "validation": order[:n // 10], "test": order[n // 10:n // 5]}
    splits = {}
    for split, index in parts.items():
        row = {}
        for column, m in zip(("modality_a", "modality_b"), modalities):
            x = values[m][index]
            if max_seq_len is not None and m == "timeseries":
                x = _crop(x, np.zeros(len(x), np.int64), max_seq_len)
            row[column] = x
        row["label"] = labels[index]
        splits[split] = row
    return splits


def load_multibench(name: str, data_dir: str | Path, modalities: tuple[str, str] | None = None, *,
                    max_seq_len: int | None = None, aligned: bool = True, z_norm: bool = False,
                    mimic_task: int = -1, trust_pickle: bool = False) -> datasets.DatasetDict:
    """Load MultiBench dataset ``name`` from a local pickle (``data_dir``: its folder or the file) with two of its
    modalities as ``modality_a``/``modality_b`` (see the module docstring for the preprocessing and labels).

    ``modalities`` defaults to ``("vision", "text")`` for the affect sets and ``("static", "timeseries")`` for MIMIC.
    ``max_seq_len`` is 50 for the affect sets by default; for MIMIC it pads or truncates the time series only.
    """
    key = MULTIBENCH_ALIASES.get(name.lower(), name.lower())
    if key not in MULTIBENCH_DATASETS:
        raise ValueError(f"unknown MultiBench dataset {name!r}; valid choices: "
                         f"{', '.join([*MULTIBENCH_DATASETS, *MULTIBENCH_ALIASES])}")
    spec = MULTIBENCH_DATASETS[key]
    modalities = tuple(spec.default_modalities if modalities is None else modalities)
    if len(modalities) != 2 or len(set(modalities)) != 2 or not set(modalities) <= set(spec.modalities):
        raise ValueError(f"modalities must be two different names out of {spec.modalities} for {key!r}, "
                         f"got {modalities!r}")
    if key != "mimic" and mimic_task != -1:
        raise ValueError(f"mimic_task applies to 'mimic' only, got mimic_task={mimic_task!r} for {key!r}")
    if key != "mimic" and max_seq_len is None:
        max_seq_len = DEFAULT_MAX_SEQ_LEN
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool)
                                    or max_seq_len <= 0):
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    path = _find_file(key, spec, data_dir)
    data = _read_pickle(path, trust_pickle)
    dropped = {}
    if key == "mimic":
        rows = _mimic_splits(data, modalities, max_seq_len, mimic_task)
        label_names = list(spec.label_names) if mimic_task < 0 else list(_BINARY)
    else:
        _require(data, tuple(AFFECT_SPLITS.values()), f"{str(path)!r}")
        rows = {}
        for split, raw_split in AFFECT_SPLITS.items():
            _require(data[raw_split], (*modalities, "text", "labels"), f"split {raw_split!r} of {str(path)!r}")
            rows[split], dropped[split] = _affect_split(key, data[raw_split], modalities, max_seq_len, aligned,
                                                        z_norm)
        label_names = list(spec.label_names)
    shapes = {c: rows["train"][c].shape[1:] for c in ("modality_a", "modality_b")}
    features = datasets.Features({**{c: datasets.Array2D(shape, "float32") for c, shape in shapes.items()},
                                  "label": datasets.ClassLabel(names=label_names)})
    info = {"description": f"MultiBench {key} from {path.name}: {modalities[0]} and {modalities[1]}",
            "multibench": {"name": key, "file": str(path), "modalities": dict(zip(shapes, modalities)),
                           "shapes": {c: list(s) for c, s in shapes.items()}, "max_seq_len": max_seq_len,
                           "aligned": aligned, "z_norm": z_norm, "mimic_task": mimic_task if key == "mimic" else None,
                           "label_rule": spec.label_rule, "dropped_empty_text": dropped}}
    stat = path.stat()
    source = f"{json.dumps(info)} {stat.st_size} {stat.st_mtime_ns}"
    return datasets.DatasetDict({
        split: arrays_to_dataset(row, features, json.dumps(info),
                                 hashlib.sha256(f"{source} {split}".encode()).hexdigest()[:16])
        for split, row in rows.items()})


__all__ = ["MULTIBENCH_ALIASES", "MULTIBENCH_DATASETS", "MultiBenchSpec", "load_multibench"]
