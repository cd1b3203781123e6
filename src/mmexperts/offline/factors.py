"""Two-modality token-sequence data from controllable latent factors (a FactorCL-style generator, re-implemented).

Each sample draws Gaussian factor groups: ``shared`` (seen by both modalities), ``unique_a`` / ``unique_b`` (seen by
one), ``synergy`` (one half per modality; only their product carries the label, so neither modality alone does) and
per-modality ``noise`` (nuisance, never label-relevant). Every token of a modality shows exactly one of that
modality's groups through a fixed random nonlinear map of the group, with tokens assigned to groups in a per-sample
random order, so token content (not position) says which concept it carries. The binary label is the sign of the
summed, unit-variance scores of the groups in ``label_from``; groups left out are label-irrelevant.

``spurious_strength`` adds a train/test shift in the nuisance factors: in the train split only, the ``noise`` group
of each modality in ``spurious_modalities`` is made to agree with the label (the sign of its summed latent is set to
the label's sign with probability ``spurious_strength``, else left independent, so train agreement is
``(1 + spurious_strength) / 2``); validation and test keep noise independent of the label (a FactorCL-style
train/test shift in nuisance factors). A model that leans on the nuisance concepts loses accuracy on held-out data;
discarding them (e.g. S3's pruning of experts by validation utility) recovers it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable, table_cast

FACTOR_GROUPS: tuple[str, ...] = ("shared", "unique_a", "unique_b", "synergy")
FACTOR_LABEL_NAMES: list[str] = ["negative", "positive"]
_SPLIT_STREAMS = {"train": 0, "validation": 1, "test": 2}
_MAP_STREAM = 3
_SPURIOUS_STREAM = 4


@dataclass(frozen=True)
class FactorSpec:
    """Arguments of one factor dataset; stored as JSON in every split's ``DatasetInfo.description``."""

    seq_len: int
    dim_a: int
    dim_b: int
    shared_dims: int
    unique_a_dims: int
    unique_b_dims: int
    synergy_dims: int
    noise_dims: int
    label_from: tuple[str, ...]
    noise_std: float
    seed: int
    spurious_strength: float = 0.0
    spurious_modalities: tuple[str, ...] = ("a", "b")

    def groups(self, modality: str) -> dict[str, int]:
        """Latent groups modality ``"a"`` or ``"b"`` shows, with their sizes (absent groups left out)."""
        sizes = {"shared": self.shared_dims, f"unique_{modality}": getattr(self, f"unique_{modality}_dims"),
                 "synergy": self.synergy_dims, "noise": self.noise_dims}
        return {group: size for group, size in sizes.items() if size > 0}

    @classmethod
    def from_info(cls, info: datasets.DatasetInfo) -> FactorSpec:
        """The spec of a split built by ``build_factor_dataset`` (``FactorSpec.from_info(ds["train"].info)``)."""
        try:
            fields = json.loads(info.description or "")["factors"]
        except (ValueError, KeyError, TypeError):
            raise ValueError("this dataset was not built by build_factor_dataset: its DatasetInfo.description holds "
                             f"no factor record ({(info.description or '')[:80]!r})") from None
        fields = {**fields, "label_from": tuple(fields["label_from"])}
        if "spurious_modalities" in fields:
            fields["spurious_modalities"] = tuple(fields["spurious_modalities"])
        return cls(**fields)


def _check(spec: FactorSpec, sizes: dict[str, int]) -> None:
    for name, value in {**sizes, "seq_len": spec.seq_len, "dim_a": spec.dim_a, "dim_b": spec.dim_b}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("shared_dims", "unique_a_dims", "unique_b_dims", "synergy_dims", "noise_dims"):
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0 leaves the group out), got {value!r}")
    if not spec.label_from or any(g not in FACTOR_GROUPS for g in spec.label_from) or \
            len(set(spec.label_from)) < len(spec.label_from):
        raise ValueError(f"label_from must be a non-empty subset of {FACTOR_GROUPS} without repeats, "
                         f"got {spec.label_from!r}")
    empty = [g for g in spec.label_from if getattr(spec, f"{g}_dims") == 0]
    if empty:
        raise ValueError(f"label_from names groups with 0 dims: {empty}; give them {empty[0]}_dims > 0 or drop them")
    if not isinstance(spec.seed, int) or isinstance(spec.seed, bool) or spec.seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {spec.seed!r}")
    if not isinstance(spec.noise_std, (int, float)) or not np.isfinite(spec.noise_std) or spec.noise_std < 0:
        raise ValueError(f"noise_std must be a finite number >= 0, got {spec.noise_std!r}")
    strength = spec.spurious_strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"spurious_strength must be a number in [0, 1] (0: no spurious correlation), "
                         f"got {strength!r}")
    if not spec.spurious_modalities or not set(spec.spurious_modalities) <= {"a", "b"} or \
            len(set(spec.spurious_modalities)) < len(spec.spurious_modalities):
        raise ValueError(f"spurious_modalities must be a non-empty subset of ('a', 'b') without repeats, "
                         f"got {spec.spurious_modalities!r}")
    if strength > 0 and spec.noise_dims == 0:
        raise ValueError(f"spurious_strength={strength} needs noise factors to correlate: give noise_dims > 0 "
                         "or set spurious_strength=0")
    for m in ("a", "b"):
        groups = spec.groups(m)
        if len(groups) > spec.seq_len:
            raise ValueError(f"seq_len={spec.seq_len} is shorter than the {len(groups)} factor groups of modality "
                             f"{m} ({', '.join(groups)}); every group needs a token: raise seq_len")


def _maps(spec: FactorSpec, modality: str, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, ...]]:
    """Per group a fixed random map z -> tanh(z W + b) Q into the modality's feature space (Q orthogonal)."""
    dim = spec.dim_a if modality == "a" else spec.dim_b
    maps = {}
    for group, size in spec.groups(modality).items():
        weight = rng.normal(0.0, 1.0 / np.sqrt(size), (size, dim))
        rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        maps[group] = (weight, rng.normal(0.0, 0.5, dim), rotation)
    return maps


def _make_spurious(latents: dict[str, np.ndarray], label: np.ndarray, strength: float, modalities: tuple[str, ...],
                   rng: np.random.Generator) -> None:
    """Flip each noise group's latent (in place; the Gaussian marginal is unchanged) so that the sign of its sum
    equals the label's sign with probability ``strength`` (else it stays independent)."""
    target = 2.0 * label - 1.0
    for modality in modalities:
        noise = latents[f"noise_{modality}"]
        forced = rng.random(len(noise)) < strength
        agrees = np.sign(noise.sum(1)) == target
        latents[f"noise_{modality}"] = np.where((forced & ~agrees)[:, None], -noise, noise)


def _split(spec: FactorSpec, size: int, maps: dict, rng: np.random.Generator,
           spurious_rng: np.random.Generator | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    latents = {"shared": rng.normal(size=(size, spec.shared_dims)),
               "unique_a": rng.normal(size=(size, spec.unique_a_dims)),
               "unique_b": rng.normal(size=(size, spec.unique_b_dims)),
               "synergy_a": rng.normal(size=(size, spec.synergy_dims)),
               "synergy_b": rng.normal(size=(size, spec.synergy_dims)),
               "noise_a": rng.normal(size=(size, spec.noise_dims)),
               "noise_b": rng.normal(size=(size, spec.noise_dims))}
    scores = {"shared": latents["shared"].sum(1), "unique_a": latents["unique_a"].sum(1),
              "unique_b": latents["unique_b"].sum(1), "synergy": (latents["synergy_a"] * latents["synergy_b"]).sum(1)}
    score = sum(scores[g] / np.sqrt(getattr(spec, f"{g}_dims")) for g in spec.label_from)
    label = (score > 0).astype(np.int64)
    if spurious_rng is not None:
        _make_spurious(latents, label, spec.spurious_strength, spec.spurious_modalities, spurious_rng)
    row = {}
    for m in ("a", "b"):
        mapped = np.stack([np.tanh(latents[g if g in latents else f"{g}_{m}"] @ weight + bias) @ rotation
                           for g, (weight, bias, rotation) in maps[m].items()], axis=1).astype(np.float32)
        slots = np.resize(np.arange(mapped.shape[1]), spec.seq_len)  # round-robin: every group gets a token
        order = rng.permuted(np.tile(slots, (size, 1)), axis=1)  # per-sample token positions
        noise = rng.standard_normal((size, spec.seq_len, mapped.shape[2]), dtype=np.float32) * np.float32(
            spec.noise_std)
        row[f"modality_{m}"] = np.take_along_axis(mapped, order[:, :, None], axis=1) + noise
    row["label"] = label
    return row, {**latents, "score": score}


def arrays_to_dataset(columns: dict[str, np.ndarray], features: datasets.Features, description: str,
                      fingerprint: str) -> datasets.Dataset:
    """An in-memory ``Dataset`` from [N, seq_len, dim] float32 arrays (``Array2D`` features) and [N] label arrays,
    built as Arrow arrays directly: much faster than ``Dataset.from_dict``, which converts row by row."""
    arrays = {}
    for name, values in columns.items():
        if values.ndim == 3:
            n, steps, dim = values.shape
            inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * steps * dim + 1, dim, dtype=np.int32)),
                                             pa.array(np.ascontiguousarray(values, np.float32).ravel()))
            arrays[name] = pa.ListArray.from_arrays(pa.array(np.arange(0, n * steps + 1, steps, dtype=np.int32)),
                                                    inner)
        else:
            arrays[name] = pa.array(values)
    table = table_cast(pa.table(arrays), features.arrow_schema)
    info = datasets.DatasetInfo(description=description, features=features)
    return datasets.Dataset(InMemoryTable(table), info=info, fingerprint=fingerprint)


def build_factor_dataset(num_train: int = 2000, num_validation: int = 500, num_test: int = 500, seq_len: int = 8,
                         dim_a: int = 32, dim_b: int = 32, shared_dims: int = 2, unique_a_dims: int = 2,
                         unique_b_dims: int = 2, synergy_dims: int = 1, noise_dims: int = 2,
                         label_from: tuple[str, ...] = FACTOR_GROUPS, noise_std: float = 0.1, seed: int = 0,
                         spurious_strength: float = 0.0, spurious_modalities: tuple[str, ...] = ("a", "b"),
                         return_latents: bool = False):
    """``train``/``validation``/``test`` with ``modality_a`` [seq_len, dim_a], ``modality_b`` [seq_len, dim_b]
    (float32 ``Array2D``) and a binary ``label`` from the factor groups in ``label_from`` (see the module docstring).

    Deterministic in ``seed``; each split and the feature maps use their own random stream, so changing one split's
    size leaves the others unchanged. With ``return_latents=True`` also returns ``{split: {factor: array}}`` (plus
    the label ``score``) for probing which factors the label depends on. ``spurious_strength`` in [0, 1] makes
    the noise groups of ``spurious_modalities`` (``"a"``, ``"b"`` or both) agree with the label in ``train`` only
    (see the module docstring); 0 (default) leaves them independent everywhere.
    """
    label_from = (label_from,) if isinstance(label_from, str) else tuple(label_from)
    spurious_modalities = tuple(spurious_modalities)  # "ab" -> ("a", "b")
    spec = FactorSpec(seq_len, dim_a, dim_b, shared_dims, unique_a_dims, unique_b_dims, synergy_dims, noise_dims,
                      label_from, noise_std, seed, spurious_strength, spurious_modalities)
    sizes = {"num_train": num_train, "num_validation": num_validation, "num_test": num_test}
    _check(spec, sizes)
    map_rng = np.random.default_rng([seed, _MAP_STREAM])
    maps = {m: _maps(spec, m, map_rng) for m in ("a", "b")}
    features = datasets.Features({"modality_a": datasets.Array2D((seq_len, dim_a), "float32"),
                                  "modality_b": datasets.Array2D((seq_len, dim_b), "float32"),
                                  "label": datasets.ClassLabel(names=FACTOR_LABEL_NAMES)})
    info = {"description": "synthetic two-modality factor data; the label depends only on label_from",
            "factors": asdict(spec), "groups": {"modality_a": spec.groups("a"), "modality_b": spec.groups("b")}}
    splits, latents = datasets.DatasetDict(), {}
    for split, size in zip(_SPLIT_STREAMS, sizes.values()):
        spurious_rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], _SPURIOUS_STREAM]) \
            if split == "train" and spurious_strength > 0 else None
        row, latents[split] = _split(spec, size, maps, np.random.default_rng([seed, _SPLIT_STREAMS[split]]),
                                     spurious_rng)
        fingerprint = hashlib.sha256(f"{json.dumps(info)} {split} {size}".encode()).hexdigest()[:16]
        splits[split] = arrays_to_dataset(row, features, json.dumps(info), fingerprint)
    return (splits, latents) if return_latents else splits


__all__ = ["FACTOR_GROUPS", "FACTOR_LABEL_NAMES", "FactorSpec", "arrays_to_dataset", "build_factor_dataset"]
