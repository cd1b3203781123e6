"""Retrieval over pre-stored embeddings: a FAISS vector store kept on disk as safetensors, and Recall@K / RSUM.

The gallery side (e.g. images through their frozen tower) is encoded once, L2-normalised and indexed; queries
(e.g. captions through their tower plus a connector) are answered by inner product, i.e. cosine similarity.
Three FAISS indexes: exact ``"flat"`` (``IndexFlatIP``), and approximate ``"ivf"`` (``IndexIVFFlat``: k-means
cells, ``nprobe`` of them scanned per query) and ``"hnsw"`` (``IndexHNSWFlat``: graph walk of width ``ef_search``).
Recall is counted by the ``recall_at_k`` evaluate metric of this package, so there is one Recall@K implementation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .atomic import atomic_directory
from .checksums import tensor_sha256
from .errors import CorruptFileError
from .metrics import load_metric

INDEX_TYPES: tuple[str, ...] = ("flat", "ivf", "hnsw")
METRIC = "cosine"  # inner product of L2-normalised vectors
PROTOCOLS: tuple[str, ...] = ("multi_caption", "pairwise")
VECTORS_FILE, CONFIG_FILE = "vectors.safetensors", "store.json"
FORMAT_VERSION = 2  # 2: store.json holds the sha256 of each saved tensor
INDEX_PARAMS: dict[str, tuple[str, ...]] = {"flat": (), "ivf": ("nlist", "nprobe"),
                                            "hnsw": ("hnsw_m", "ef_construction", "ef_search")}
INDEX_CLASSES = {"ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}
REBUILD = "rebuild the store with VectorStore.save"

EncodeFn = Callable[[Any], torch.Tensor]


@dataclass
class SearchResult:
    """Top-k answers per query, best first.

    ``positions`` are rows of the store (-1 where an approximate index found fewer than k candidates; ``ids`` holds
    -1 or "" there), ``query_ids`` the ids read from the query batches when an ``id_key`` was given.
    """

    scores: torch.Tensor          # (num_queries, k) float32 cosine similarities
    positions: torch.Tensor       # (num_queries, k) int64
    ids: np.ndarray               # (num_queries, k) gallery ids
    query_ids: np.ndarray | None = None


def encode_batches(encode_fn: EncodeFn, batches: Iterable, *, id_key: str | None = None, progress: bool = True,
                   description: str = "encoding") -> tuple[torch.Tensor, list | None]:
    """Run ``encode_fn`` over batches (a DataLoader or any iterable) without gradients; concatenate to (n, dim).

    With ``id_key``, each batch must be a mapping holding that key; its values become the ids and the key is
    removed from what ``encode_fn`` sees (so ``lambda b: model(**b).image_embeds`` works unchanged).
    """
    chunks, ids = [], [] if id_key is not None else None
    total = len(batches) if hasattr(batches, "__len__") else None
    with torch.inference_mode():
        for batch in tqdm(batches, total=total, desc=description, disable=not progress):
            if id_key is not None:
                if not isinstance(batch, Mapping) or id_key not in batch:
                    found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
                    raise KeyError(f"id_key={id_key!r} is not in the batch (found {found}); batches must be dicts "
                                   f"holding the ids under {id_key!r}, or pass ids=... and id_key=None")
                batch = dict(batch)
                batch_ids = batch.pop(id_key)
                ids.extend(batch_ids.tolist() if isinstance(batch_ids, (torch.Tensor, np.ndarray)) else batch_ids)
            out = encode_fn(batch)
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise TypeError(f"encode_fn must return a (batch, dim) tensor, got {got}; return the pooled "
                                "embedding, e.g. lambda batch: model(**batch).image_embeds")
            chunks.append(out.detach().to("cpu", torch.float32))
    if not chunks:
        raise ValueError("the batches yielded nothing to encode: the gallery (or query set) is empty; pass a "
                         "DataLoader or iterable with at least one batch")
    vectors = torch.cat(chunks)
    if ids is not None and len(ids) != len(vectors):
        raise ValueError(f"the batches gave {len(ids)} ids under {id_key!r} but encode_fn returned {len(vectors)} "
                         "vectors; the id column must have one entry per encoded row")
    return vectors, ids


def _normalised(vectors: torch.Tensor | np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    """Validate a (n, dim) float matrix and return it L2-normalised as contiguous float32."""
    array = vectors.detach().to("cpu", torch.float32).numpy() if isinstance(vectors, torch.Tensor) else \
        np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (count, dim) matrix, got shape {tuple(array.shape)}; stack the "
                         "embeddings into one tensor (a single vector needs shape (1, dim))")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(array.shape)}); a store and its queries need at least "
                         "one vector of dimension >= 1")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} have dimension {array.shape[1]} but the store holds {dim}-d vectors; encode them "
                         f"with the same model (tower + connector) that built the gallery, whose output is {dim}-d, "
                         "or rebuild the store from the new model")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{what} hold non-finite values (NaN/inf) in rows {bad[:5].tolist()}"
                         f"{' ...' if bad.size > 5 else ''}; expected finite embeddings: check the model for "
                         "overflow (e.g. fp16) or drop those rows")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        bad = np.flatnonzero(norms[:, 0] == 0)
        raise ValueError(f"{what} rows {bad[:5].tolist()} are all zeros and have no direction for cosine "
                         "similarity; drop them or fix the encoder")
    norms[np.abs(norms - 1) <= 1e-6] = 1.0  # unit rows stay bit-exact, so a reloaded store equals the saved one
    return np.ascontiguousarray(array / norms, dtype=np.float32)


def _id_array(ids: Sequence | None, count: int) -> np.ndarray:
    if ids is None:
        return np.arange(count, dtype=np.int64)
    ids = list(ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else ids)
    if len(ids) != count:
        raise ValueError(f"got {len(ids)} ids for {count} vectors; pass exactly one id per vector (several "
                         "vectors may share an id, e.g. the captions of one image)")
    if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        return np.asarray(ids, dtype=np.int64)
    if all(isinstance(i, str) for i in ids):
        return np.asarray(ids, dtype=str)
    kinds = sorted({type(i).__name__ for i in ids})
    raise TypeError(f"ids must be all integers or all strings, got {kinds}; convert them, e.g. str(image_id)")


class VectorStore:
    """L2-normalised float32 vectors with ids, indexed by FAISS for cosine top-k search; saved as safetensors.

    Build it from tensors (``VectorStore(vectors, ids)``) or by encoding a gallery once (``from_encoder``);
    ``save``/``load`` round-trip vectors, ids and the trained index, so reloaded stores answer without re-encoding.
    Approximate indexes: ``index_type="ivf"`` (``nlist`` cells, default ~4 sqrt(n) capped at n/39; ``nprobe``
    scanned, default min(16, nlist)) or ``"hnsw"`` (``hnsw_m`` links per node, ``ef_construction``, ``ef_search``).
    """

    def __init__(self, vectors: torch.Tensor | np.ndarray, ids: Sequence | None = None, *, index_type: str = "flat",
                 nlist: int | None = None, nprobe: int | None = None, hnsw_m: int = 32, ef_construction: int = 80,
                 ef_search: int = 64, _index: faiss.Index | None = None):
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index_type {index_type!r}; expected one of {', '.join(INDEX_TYPES)} "
                             "('flat' exact, 'ivf' or 'hnsw' approximate)")
        array = _normalised(vectors, "gallery vectors")
        self._vectors = torch.from_numpy(array)
        self.ids = _id_array(ids, len(array))
        self.index_type = index_type
        self.params = self._check_params(len(array), nlist, nprobe, hnsw_m, ef_construction, ef_search)
        self.index = _index if _index is not None else self._build_index(array)
        if self.index.ntotal != len(array) or self.index.d != self.dim:
            raise ValueError(f"the FAISS index holds {self.index.ntotal} vectors of dimension {self.index.d}, but the "
                             f"store has {len(array)} of dimension {self.dim}; the saved store is inconsistent, "
                             "rebuild it")
        self.set_search_params(nprobe=self.params.get("nprobe"), ef_search=self.params.get("ef_search"))

    # construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_encoder(cls, encode_fn: EncodeFn, batches: Iterable, *, ids: Sequence | None = None,
                     id_key: str | None = None, progress: bool = True, **index_kwargs) -> VectorStore:
        """Encode a gallery once with ``encode_fn`` (e.g. a frozen tower) and index it.

        Ids come from ``ids`` or from each batch's ``id_key`` column (several rows may share an id).
        """
        if ids is not None and id_key is not None:
            raise ValueError("pass either ids=... or id_key=..., not both")
        vectors, batch_ids = encode_batches(encode_fn, batches, id_key=id_key, progress=progress,
                                            description="encoding gallery")
        return cls(vectors, ids if batch_ids is None else batch_ids, **index_kwargs)

    def _check_params(self, count, nlist, nprobe, hnsw_m, ef_construction, ef_search) -> dict:
        if self.index_type == "flat":
            return {}
        if self.index_type == "hnsw":
            for name, value in (("hnsw_m", hnsw_m), ("ef_construction", ef_construction), ("ef_search", ef_search)):
                if int(value) < 1:
                    raise ValueError(f"{name}={value} must be a positive integer")
            return {"hnsw_m": int(hnsw_m), "ef_construction": int(ef_construction), "ef_search": int(ef_search)}
        # ~4 sqrt(n) cells, and at least 39 training vectors per cell (FAISS k-means' own minimum)
        nlist = int(nlist) if nlist is not None else max(1, min(round(4 * math.sqrt(count)), count // 39))
        if not 1 <= nlist <= count:
            raise ValueError(f"nlist={nlist} k-means cells need at least {nlist} gallery vectors, the gallery has "
                             f"{count}; use nlist <= {count} (about 4*sqrt(n) = {round(4 * math.sqrt(count))} is "
                             "typical) or index_type='flat'")
        nprobe = int(nprobe) if nprobe is not None else min(16, nlist)
        if not 1 <= nprobe <= nlist:
            raise ValueError(f"nprobe={nprobe} must be between 1 and nlist={nlist} (the number of cells to scan)")
        return {"nlist": nlist, "nprobe": nprobe}

    def _build_index(self, array: np.ndarray) -> faiss.Index:
        dim = array.shape[1]
        if self.index_type == "flat":
            index = faiss.IndexFlatIP(dim)
        elif self.index_type == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, self.params["nlist"], faiss.METRIC_INNER_PRODUCT)
            index.train(array)
        else:
            index = faiss.IndexHNSWFlat(dim, self.params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.params["ef_construction"]
        index.add(array)
        return index

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Trade speed for recall at query time: IVF cells scanned (``nprobe``), HNSW search width (``ef_search``)."""
        if nprobe is not None:
            if self.index_type != "ivf":
                raise ValueError(f"nprobe applies to index_type='ivf', this store is {self.index_type!r}")
            if not 1 <= int(nprobe) <= self.params["nlist"]:
                raise ValueError(f"nprobe={nprobe} must be between 1 and nlist={self.params['nlist']}")
            self.index.nprobe = self.params["nprobe"] = int(nprobe)
        if ef_search is not None:
            if self.index_type != "hnsw":
                raise ValueError(f"ef_search applies to index_type='hnsw', this store is {self.index_type!r}")
            if int(ef_search) < 1:
                raise ValueError(f"ef_search={ef_search} must be a positive integer")
            self.index.hnsw.efSearch = self.params["ef_search"] = int(ef_search)

    def select(self, positions: Sequence[int] | np.ndarray | torch.Tensor) -> VectorStore:
        """A new store over some rows (same index type and settings), e.g. one caption per image."""
        positions = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        params = dict(self.params)
        if "nlist" in params:
            params["nlist"] = min(params["nlist"], len(positions))
            params["nprobe"] = min(params["nprobe"], params["nlist"])
        return VectorStore(self._vectors[positions], self.ids[positions.numpy()], index_type=self.index_type,
                           **params)

    # properties ---------------------------------------------------------------------------------------------
    @property
    def vectors(self) -> torch.Tensor:
        """The stored (n, dim) L2-normalised float32 vectors."""
        return self._vectors

    @property
    def dim(self) -> int:
        return self._vectors.shape[1]

    def __len__(self) -> int:
        return self._vectors.shape[0]

    def __repr__(self) -> str:
        return f"VectorStore(n={len(self)}, dim={self.dim}, index_type={self.index_type!r}, params={self.params})"

    # search -------------------------------------------------------------------------------------------------
    def search(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> SearchResult:
        """Top-k gallery items for each query vector (normalised here), by cosine similarity, best first."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k={k!r} must be a positive integer")
        if k > len(self):
            raise ValueError(f"k={k} is larger than the gallery of {len(self)} vectors; use k <= {len(self)}")
        array = _normalised(queries, "query vectors", dim=self.dim)
        scores, positions = self.index.search(array, int(k))
        positions = positions.astype(np.int64)
        found = positions >= 0
        ids = np.where(found, self.ids[np.where(found, positions, 0)], -1 if self.ids.dtype.kind == "i" else "")
        return SearchResult(torch.from_numpy(scores), torch.from_numpy(positions), ids)

    def search_encoded(self, encode_fn: EncodeFn, batches: Iterable, k: int = 10, *, id_key: str | None = None,
                       progress: bool = True) -> SearchResult:
        """Encode queries with ``encode_fn`` (e.g. tower + connector) and search; ``id_key`` fills ``query_ids``."""
        queries, query_ids = encode_batches(encode_fn, batches, id_key=id_key, progress=progress,
                                            description="encoding queries")
        result = self.search(queries, k)
        if query_ids is not None:
            result.query_ids = _id_array(query_ids, len(queries))
        return result

    # persistence --------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the store atomically to a folder: vectors (+ the trained approximate index) as safetensors, and a
        small JSON with dim, metric, index type and settings, ids, and the sha256 of each tensor."""
        tensors = {"vectors": self._vectors.contiguous()}
        if self.index_type != "flat":  # IVF centroids and HNSW graphs are kept, not rebuilt on load
            tensors["faiss_index"] = torch.from_numpy(faiss.serialize_index(self.index).copy())
        config = {"format_version": FORMAT_VERSION, "count": len(self), "dim": self.dim, "metric": METRIC,
                  "index_type": self.index_type, "index_params": self.params,
                  "id_type": "int" if self.ids.dtype.kind == "i" else "str", "ids": self.ids.tolist(),
                  "sha256": {name: tensor_sha256(tensor) for name, tensor in tensors.items()}}
        with atomic_directory(path) as staging:
            save_file(tensors, str(staging / VECTORS_FILE))
            (staging / CONFIG_FILE).write_text(json.dumps(config))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorStore:
        """Reload a saved store; nothing is re-encoded and approximate indexes are not retrained.

        The tensors must match the sha256 sums in ``store.json``, and the saved FAISS index its type, dimension,
        count and settings; otherwise ``CorruptFileError`` names the file and the mismatch.
        """
        path = Path(path)
        missing = [name for name in (VECTORS_FILE, CONFIG_FILE) if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a saved VectorStore: missing {', '.join(missing)}; create one "
                                    "with VectorStore.save(path)")
        config = _read_config(path / CONFIG_FILE)
        tensors = _read_tensors(path / VECTORS_FILE, config)
        index = _read_index(path / VECTORS_FILE, tensors, config)
        try:
            return cls(tensors["vectors"], config["ids"], index_type=config["index_type"], _index=index,
                       **config["index_params"])
        except (OverflowError, TypeError, ValueError) as error:
            raise CorruptFileError(path, f"The saved store is inconsistent ({error}); {REBUILD}.") from error


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_config(file: Path) -> dict:
    """Parse ``store.json`` and check its keys, types and values against each other."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(file, f"Not valid JSON ({error}); {REBUILD}.") from error
    if not isinstance(config, dict):
        raise CorruptFileError(file, f"Expected a JSON object, found {type(config).__name__}; {REBUILD}.")
    if config.get("format_version") != FORMAT_VERSION or config.get("metric") != METRIC:
        raise ValueError(f"{file} has format_version={config.get('format_version')!r}, "
                         f"metric={config.get('metric')!r}; this version reads format_version={FORMAT_VERSION} "
                         f"with metric={METRIC!r}; rebuild the store with this version (VectorStore.save)")
    kinds = {"count": int, "dim": int, "index_type": str, "index_params": dict, "id_type": str, "ids": list,
             "sha256": dict}
    missing = [key for key in kinds if key not in config]
    if missing:
        raise CorruptFileError(file, f"Missing the keys {missing}; {REBUILD}.")
    for key, kind in kinds.items():
        value = config[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CorruptFileError(file, f"Key {key!r} holds {type(value).__name__} {value!r:.60}, expected "
                                         f"{kind.__name__}; {REBUILD}.")
    for key in ("count", "dim"):
        if config[key] < 1:
            raise CorruptFileError(file, f"Key {key!r} is {config[key]}, expected a positive integer; {REBUILD}.")
    index_type, params = config["index_type"], config["index_params"]
    if index_type not in INDEX_TYPES:
        raise CorruptFileError(file, f"Unknown index_type {index_type!r}, expected one of "
                                     f"{', '.join(INDEX_TYPES)}; {REBUILD}.")
    if sorted(params) != sorted(INDEX_PARAMS[index_type]):
        raise CorruptFileError(file, f"index_params has keys {sorted(params)}, index_type={index_type!r} takes "
                                     f"{sorted(INDEX_PARAMS[index_type])}; {REBUILD}.")
    bad = {key: value for key, value in params.items() if not _is_int(value) or value < 1}
    if bad:
        raise CorruptFileError(file, f"index_params {bad} are not positive integers; {REBUILD}.")
    id_check = {"int": _is_int, "str": lambda value: isinstance(value, str)}.get(config["id_type"])
    if id_check is None:
        raise CorruptFileError(file, f"id_type is {config['id_type']!r}, expected 'int' or 'str'; {REBUILD}.")
    if len(config["ids"]) != config["count"]:
        raise CorruptFileError(file, f"Holds {len(config['ids'])} ids for count={config['count']} vectors, "
                                     f"expected one id per vector; {REBUILD}.")
    wrong = [value for value in config["ids"] if not id_check(value)]
    if wrong:
        raise CorruptFileError(file, f"Holds the id {wrong[0]!r:.60} but id_type is {config['id_type']!r}; "
                                     f"{REBUILD}.")
    return config


def _read_tensors(file: Path, config: dict) -> dict[str, torch.Tensor]:
    """Load ``vectors.safetensors`` and check its tensors against ``store.json``: names, shapes, dtypes, sha256."""
    try:
        tensors = load_file(str(file))
    except (SafetensorError, ValueError, TypeError, KeyError, RuntimeError) as error:
        raise CorruptFileError(file, f"Not a readable safetensors file ({error}); {REBUILD}.") from error
    index_type = config["index_type"]
    if index_type == "flat" and "faiss_index" in tensors:
        raise CorruptFileError(file, f"Holds a saved FAISS index but {CONFIG_FILE} says index_type='flat', which "
                                     f"keeps none; the two files disagree, {REBUILD}.")
    expected = {"vectors"} | ({"faiss_index"} if index_type != "flat" else set())
    if set(tensors) != expected:
        raise CorruptFileError(file, f"Holds the tensors {sorted(tensors)}, index_type={index_type!r} needs "
                                     f"{sorted(expected)}; {REBUILD}.")
    vectors, shape = tensors["vectors"], (config["count"], config["dim"])
    if vectors.dtype != torch.float32 or tuple(vectors.shape) != shape:
        raise CorruptFileError(file, f"Holds {vectors.dtype} vectors of shape {tuple(vectors.shape)}, "
                                     f"{CONFIG_FILE} says float32 {shape}; {REBUILD}.")
    if "faiss_index" in tensors and (tensors["faiss_index"].dtype != torch.uint8 or tensors["faiss_index"].dim() != 1):
        raise CorruptFileError(file, f"Holds a faiss_index tensor of {tensors['faiss_index'].dtype} and shape "
                                     f"{tuple(tensors['faiss_index'].shape)}, expected 1-D uint8 bytes; {REBUILD}.")
    if set(config["sha256"]) != expected:
        raise CorruptFileError(file.with_name(CONFIG_FILE), f"Holds sha256 sums for {sorted(config['sha256'])}, "
                                                            f"expected {sorted(expected)}; {REBUILD}.")
    for name, tensor in tensors.items():
        digest = tensor_sha256(tensor)
        if digest != config["sha256"][name]:
            raise CorruptFileError(file, f"The {name!r} tensor has sha256 {digest[:16]}..., {CONFIG_FILE} records "
                                         f"{str(config['sha256'][name])[:16]}...; the file was damaged or changed "
                                         f"after saving, {REBUILD}.")
    return tensors


def _read_index(file: Path, tensors: dict[str, torch.Tensor], config: dict) -> faiss.Index | None:
    """Deserialize the saved FAISS index and check it against ``store.json``: type, d, ntotal, metric, settings."""
    index_type = config["index_type"]
    if index_type == "flat":
        return None
    try:
        loaded = faiss.deserialize_index(tensors["faiss_index"].numpy())
    except RuntimeError as error:
        raise CorruptFileError(file, f"The faiss_index tensor is not a FAISS index ({error}); {REBUILD}.") from error
    index = faiss.downcast_index(loaded)
    if index is not loaded:  # the concrete view owns the index from here on
        index.thisown, loaded.thisown = loaded.thisown, False
    expected_class = INDEX_CLASSES[index_type]
    if type(index) is not expected_class:
        raise CorruptFileError(file, f"The saved index is a {type(index).__name__}, {CONFIG_FILE} says "
                                     f"index_type={index_type!r} ({expected_class.__name__}); {REBUILD}.")
    params = config["index_params"]
    checks = [("d", index.d, config["dim"]), ("ntotal", index.ntotal, config["count"]),
              ("metric_type", index.metric_type, faiss.METRIC_INNER_PRODUCT)]
    if index_type == "ivf":
        checks += [("nlist", index.nlist, params["nlist"]), ("is_trained", index.is_trained, True)]
    else:
        checks += [("hnsw_m", index.hnsw.nb_neighbors(1), params["hnsw_m"]),
                   ("ef_construction", index.hnsw.efConstruction, params["ef_construction"])]
    for name, found, wanted in checks:
        if found != wanted:
            raise CorruptFileError(file, f"The saved {index_type} index has {name}={found}, {CONFIG_FILE} says "
                                         f"{wanted}; the two files disagree, {REBUILD}.")
    return index


# evaluation ---------------------------------------------------------------------------------------------------
def recall_at_k(hits: np.ndarray | torch.Tensor, k_values: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K from ranked retrieval results: ``hits[q, r]`` says whether the r-th result of query q is correct.

    Counted by the package's ``recall_at_k`` evaluate metric: each row becomes scores that decrease with rank,
    plus one last column that stands for "a correct item ranked after the retrieved ones", so queries with no hit
    in the list count as misses at every K <= the list length.
    """
    hits = np.asarray(hits, dtype=bool)
    if hits.ndim != 2 or hits.shape[0] == 0:
        raise ValueError(f"hits must be a non-empty (num_queries, retrieved) matrix, got shape {hits.shape}")
    depth = hits.shape[1]
    too_deep = [k for k in k_values if k > depth]
    if too_deep:
        raise ValueError(f"k={max(too_deep)} is larger than the {depth} results retrieved per query; retrieve at "
                         f"least max(k_values) results")
    scores = np.arange(depth, -1, -1, dtype=np.float32)  # rank 0 scores highest; the extra column scores 0
    references = [np.flatnonzero(row).tolist() + [depth] for row in hits]
    metric = load_metric("recall_at_k")
    return metric.compute(predictions=np.broadcast_to(scores, (len(hits), depth + 1)), references=references,
                          k_values=list(k_values))


def _hits(result: SearchResult, query_ids: np.ndarray) -> np.ndarray:
    return (result.positions.numpy() >= 0) & (result.ids == query_ids[:, None])


def retrieval_recall(image_store: VectorStore, text_store: VectorStore, *,
                     image_queries: torch.Tensor | None = None, text_queries: torch.Tensor | None = None,
                     k_values: Sequence[int] = (1, 5, 10), protocol: str = "multi_caption") -> dict[str, float]:
    """Image<->text Recall@K in both directions and RSUM, in percent (as LAVIS ``itm_eval`` and papers report).

    ``image_store`` holds one vector per image (ids = image ids, unique); ``text_store`` one vector per caption
    (ids = the id of the caption's image). Image -> text searches ``text_store`` with ``image_queries`` (default:
    the image vectors themselves, for a shared space; pass predicted text latents for a JEPA-style route), and a
    hit needs any caption of the image in the top K. Text -> image searches ``image_store`` with ``text_queries``
    (default: the caption vectors), and a hit needs the caption's own image.
    ``protocol="multi_caption"`` uses every caption (COCO 5k / Flickr 1k standard); ``"pairwise"`` keeps only the
    first caption of each image, a square one-to-one setting.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    image_ids, text_ids = image_store.ids, text_store.ids
    if image_ids.dtype.kind != text_ids.dtype.kind:
        raise TypeError("image ids and caption ids must both be integers or both strings, got "
                        f"{image_ids.dtype} and {text_ids.dtype}")
    unique, counts = np.unique(image_ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"image ids must be unique, {unique[counts > 1][:5].tolist()} repeat; store one vector "
                         "per image")
    orphans = np.setdiff1d(text_ids, image_ids)
    uncaptioned = np.setdiff1d(image_ids, text_ids)
    if orphans.size or uncaptioned.size:
        raise ValueError(f"every caption needs its image and every image a caption: caption ids without an image "
                         f"{orphans[:5].tolist()}, images without a caption {uncaptioned[:5].tolist()}; filter both "
                         "stores to the same images")
    if image_queries is None:
        image_queries = image_store.vectors
    if text_queries is None:
        text_queries = text_store.vectors
    for name, queries, count in (("image_queries", image_queries, len(image_store)),
                                 ("text_queries", text_queries, len(text_store))):
        if len(queries) != count:
            raise ValueError(f"{name} has {len(queries)} rows but its store has {count}; give one query per "
                             "stored item, in the same order")
    if protocol == "pairwise":
        _, first = np.unique(text_ids, return_index=True)
        first = np.sort(first)
        text_store = text_store.select(first)
        text_queries = text_queries[torch.from_numpy(first) if isinstance(text_queries, torch.Tensor) else first]
    depth = max(k_values)
    smallest = min((len(text_store), "image -> text"), (len(image_store), "text -> image"))
    if depth > smallest[0]:
        raise ValueError(f"k={depth} is larger than the {smallest[1]} gallery of {smallest[0]} items; use "
                         f"k_values <= {smallest[0]}")
    results = {}
    for direction, store, queries, query_ids in (("i2t", text_store, image_queries, image_store.ids),
                                                 ("t2i", image_store, text_queries, text_store.ids)):
        recalls = recall_at_k(_hits(store.search(queries, depth), query_ids), k_values)
        results.update({f"{direction}_r{k}": 100 * recalls[f"recall@{k}"] for k in k_values})
    results["rsum"] = sum(results.values())
    return results


__all__ = ["INDEX_TYPES", "PROTOCOLS", "SearchResult", "VectorStore", "encode_batches", "recall_at_k",
           "retrieval_recall"]
