"""Damaged or tampered adapters, vector stores and feature caches fail with CorruptFileError naming the file; valid
ones load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmexperts import AltMoEConfig, MoPEConfig, S3Config, VectorStore
from mmexperts.altmoe.features import FEATURES_FILE, CachedFeatures, cache_features
from mmexperts.checksums import tensor_sha256
from mmexperts.errors import CorruptFileError
from mmexperts.retrieval import CONFIG_FILE, VECTORS_FILE

from conftest import make_batch, make_classifier, make_clip

COUNT, DIM = 128, 12
SETTINGS = {"flat": {}, "ivf": {"nlist": 4, "nprobe": 2}, "hnsw": {"hnsw_m": 8, "ef_construction": 40}}


def vectors(count: int = COUNT, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, DIM, generator=torch.Generator().manual_seed(seed))


QUERIES = vectors(10, seed=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """One saved store per index type, with its search results before saving."""
    root = tmp_path_factory.mktemp("stores")
    stores = {}
    for kind, params in SETTINGS.items():
        store = VectorStore(vectors(), [f"id-{i}" for i in range(COUNT)], index_type=kind, **params)
        stores[kind] = (store.save(root / kind), store.search(QUERIES, k=5))
    return stores


def copy(saved, kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[kind][0], tmp_path / kind))


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    change(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def rewrite_tensors(folder: Path, change, update_checksums: bool = False) -> None:
    """Rewrite the vectors file with changed tensors (a valid safetensors file); optionally re-sign store.json."""
    tensors = load_file(str(folder / VECTORS_FILE))
    change(tensors)
    save_file(tensors, str(folder / VECTORS_FILE))
    if update_checksums:
        edit_config(folder, lambda config: config.update(sha256={k: tensor_sha256(v) for k, v in tensors.items()}))


def corrupt(file: Path, match: str, load=VectorStore.load, target: Path | None = None) -> CorruptFileError:
    """Loading ``target`` (default: the file's folder) raises CorruptFileError naming ``file``."""
    with pytest.raises(CorruptFileError, match=match) as info:
        load(target or file.parent)
    assert info.value.path == str(file) and str(info.value).startswith(str(file))
    assert "rebuild the store with VectorStore.save" in str(info.value) or "cache_features" in str(info.value)
    return info.value


def flip_in_file(file: Path, tensor: str) -> None:
    """Flip one byte in the middle of a tensor's data, in place, leaving the safetensors header valid."""
    data = bytearray(file.read_bytes())
    size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + size])[tensor]["data_offsets"]
    data[8 + size + (start + end) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


# vector store ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(SETTINGS))
def test_valid_store_round_trips(saved, kind, tmp_path):
    folder = copy(saved, kind, tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["format_version"] == 2
    assert sorted(config["sha256"]) == (["vectors"] if kind == "flat" else ["faiss_index", "vectors"])
    before, after = saved[kind][1], VectorStore.load(folder).search(QUERIES, k=5)
    assert torch.equal(after.positions, before.positions) and torch.equal(after.scores, before.scores)
    assert np.array_equal(after.ids, before.ids)


def test_relabelled_index_type(saved, tmp_path):
    folder = copy(saved, "hnsw", tmp_path)
    edit_config(folder, lambda config: config.update(index_type="flat", index_params={}))
    corrupt(folder / VECTORS_FILE, r"Holds a saved FAISS index but store.json says index_type='flat'")
    edit_config(folder, lambda config: config.update(index_type="ivf", index_params={"nlist": 4, "nprobe": 2}))
    corrupt(folder / VECTORS_FILE, r"saved index is a IndexHNSWFlat, store.json says index_type='ivf'")


def test_flat_store_with_an_index_present(saved, tmp_path):
    folder = copy(saved, "flat", tmp_path)
    index = load_file(str(saved["hnsw"][0] / VECTORS_FILE))["faiss_index"]
    rewrite_tensors(folder, lambda tensors: tensors.update(faiss_index=index), update_checksums=True)
    corrupt(folder / VECTORS_FILE, r"Holds a saved FAISS index but store.json says index_type='flat'")


@pytest.mark.parametrize(("kind", "key", "value", "match"), [
    ("ivf", "nlist", 5, r"ivf index has nlist=4, store.json says 5"),
    ("hnsw", "hnsw_m", 16, r"hnsw index has hnsw_m=8, store.json says 16"),
    ("hnsw", "ef_construction", 80, r"hnsw index has ef_construction=40, store.json says 80"),
])
def test_changed_index_params(saved, tmp_path, kind, key, value, match):
    folder = copy(saved, kind, tmp_path)
    edit_config(folder, lambda config: config["index_params"].update({key: value}))
    corrupt(folder / VECTORS_FILE, match)


def test_modified_index_tensor_fails_its_checksum(saved, tmp_path):
    folder = copy(saved, "ivf", tmp_path)

    def flip(tensors):
        index = tensors["faiss_index"].clone()
        index[len(index) // 2] ^= 0xFF
        tensors["faiss_index"] = index

    rewrite_tensors(folder, flip)
    corrupt(folder / VECTORS_FILE, r"'faiss_index' tensor has sha256 .* store.json records .* damaged or changed")


def test_swapped_index_with_matching_checksum_fails_the_consistency_check(saved, tmp_path):
    folder = copy(saved, "ivf", tmp_path)
    array = VectorStore(vectors()).vectors.numpy()
    other = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, 8, faiss.METRIC_INNER_PRODUCT)
    other.train(array)
    other.add(array)
    serialized = torch.from_numpy(faiss.serialize_index(other).copy())
    rewrite_tensors(folder, lambda tensors: tensors.update(faiss_index=serialized), update_checksums=True)
    corrupt(folder / VECTORS_FILE, r"ivf index has nlist=8, store.json says 4")


@pytest.mark.parametrize("tensor", ["faiss_index", "vectors"])
def test_raw_byte_flip_in_the_file(saved, tmp_path, tensor):
    folder = copy(saved, "ivf", tmp_path)
    flip_in_file(folder / VECTORS_FILE, tensor)
    corrupt(folder / VECTORS_FILE, rf"'{tensor}' tensor has sha256")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_truncated_or_garbage_vectors_file(saved, tmp_path, damage):
    folder = copy(saved, "hnsw", tmp_path)
    file = folder / VECTORS_FILE
    data = file.read_bytes()
    file.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not a safetensors file", "empty": b""}[damage])
    corrupt(file, r"Not a readable safetensors file \(.+\)")


@pytest.mark.parametrize(("text", "match"), [
    ("{not json", r"Not valid JSON \(.+\)"),
    ("[1, 2]", r"Expected a JSON object, found list"),
    ("\udcff", r"Not valid JSON"),
])
def test_garbage_json(saved, tmp_path, text, match):
    folder = copy(saved, "flat", tmp_path)
    (folder / CONFIG_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    corrupt(folder / CONFIG_FILE, match)


@pytest.mark.parametrize("keys", [["ids"], ["count", "dim"], ["sha256"], ["index_params"]])
def test_missing_keys(saved, tmp_path, keys):
    folder = copy(saved, "ivf", tmp_path)
    edit_config(folder, lambda config: [config.pop(key) for key in keys])
    corrupt(folder / CONFIG_FILE, rf"Missing the keys {keys}".replace("[", r"\[").replace("]", r"\]"))


@pytest.mark.parametrize(("change", "match"), [
    ({"dim": "12"}, r"Key 'dim' holds str '12', expected int"),
    ({"count": True}, r"Key 'count' holds bool True, expected int"),
    ({"ids": {"0": 1}}, r"Key 'ids' holds dict"),
    ({"index_type": "ivfpq"}, r"Unknown index_type 'ivfpq'"),
    ({"index_params": {"nlist": 4}}, r"index_params has keys \['nlist'\], index_type='ivf' takes"),
    ({"index_params": {"nlist": 4, "nprobe": -1}}, r"index_params \{'nprobe': -1\} are not positive integers"),
    ({"id_type": "int"}, r"Holds the id 'id-0' but id_type is 'int'"),
    ({"sha256": {"vectors": "0" * 64}}, r"Holds sha256 sums for \['vectors'\], expected \['faiss_index', 'vectors'\]"),
])
def test_wrong_types_and_values(saved, tmp_path, change, match):
    folder = copy(saved, "ivf", tmp_path)
    edit_config(folder, lambda config: config.update(change))
    corrupt(folder / CONFIG_FILE, match)


def test_count_mismatch(saved, tmp_path):
    folder = copy(saved, "flat", tmp_path)
    edit_config(folder, lambda config: config.update(ids=config["ids"][:-1]))
    corrupt(folder / CONFIG_FILE, rf"Holds {COUNT - 1} ids for count={COUNT} vectors")
    edit_config(folder, lambda config: config.update(count=COUNT - 1))
    corrupt(folder / VECTORS_FILE, rf"torch.float32 vectors of shape \({COUNT}, {DIM}\), store.json says float32 "
                                   rf"\({COUNT - 1}, {DIM}\)")


def test_ntotal_mismatch_in_the_index(saved, tmp_path):
    folder = copy(saved, "hnsw", tmp_path)
    edit_config(folder, lambda config: config.update(count=COUNT - 1, ids=config["ids"][:-1]))
    rewrite_tensors(folder, lambda tensors: tensors.update(vectors=tensors["vectors"][:-1].clone()),
                    update_checksums=True)
    corrupt(folder / VECTORS_FILE, rf"hnsw index has ntotal={COUNT}, store.json says {COUNT - 1}")


def test_older_format_is_refused_with_the_rebuild_message(saved, tmp_path):
    folder = copy(saved, "flat", tmp_path)
    edit_config(folder, lambda config: (config.update(format_version=1), config.pop("sha256")))
    with pytest.raises(ValueError, match=r"store.json has format_version=1.*reads format_version=2.*rebuild"):
        VectorStore.load(folder)


# feature cache --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    base = make_clip()
    torch.manual_seed(0)
    model = peft.get_peft_model(base, AltMoEConfig(num_experts=4, top_k=2, hidden_size=16, dropout=0.0,
                                                   init_weights=False)).eval()
    batch = {**make_batch(with_labels=False), "image_ids": torch.arange(4)}
    return cache_features(model, [batch], tmp_path_factory.mktemp("cache") / "features")


def copy_cache(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / "features"))


def rewrite_cache(folder: Path, change) -> None:
    """Rewrite the cache with changed tensors, keeping its metadata (sha256 sums included)."""
    file = folder / FEATURES_FILE
    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata=metadata)


def test_valid_cache_round_trips(cache, tmp_path):
    cached = CachedFeatures(copy_cache(cache, tmp_path))
    assert len(cached) == 4 and set(json.loads(cached.metadata["sha256"])) == set(cached.tensors)
    assert torch.equal(cached[2]["image_ids"], torch.tensor(2))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_garbage_cache(cache, tmp_path, damage):
    file = copy_cache(cache, tmp_path) / FEATURES_FILE
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    corrupt(file, r"Not a readable safetensors file", load=CachedFeatures)


def test_cache_missing_tensor(cache, tmp_path):
    folder = copy_cache(cache, tmp_path)
    rewrite_cache(folder, lambda tensors: tensors.pop("text_mask"))
    corrupt(folder / FEATURES_FILE, r"Missing the tensors \['text_mask'\]", load=CachedFeatures)


@pytest.mark.parametrize(("change", "match"), [
    (lambda t: t.update(text_mask=t["text_mask"][:, :-1].clone()),
     r"Tensor 'text_mask' has shape \(4, \d+\), expected"),
    (lambda t: t.update(image_ids=t["image_ids"][:3].clone()), r"different or zero example counts"),
    (lambda t: t.update(image_mask=t["image_mask"].float()), r"Tensor 'image_mask' is torch.float32"),
])
def test_cache_inconsistent_shapes(cache, tmp_path, change, match):
    folder = copy_cache(cache, tmp_path)
    rewrite_cache(folder, change)
    corrupt(folder / FEATURES_FILE, match, load=CachedFeatures)


def test_cache_checksum(cache, tmp_path):
    folder = copy_cache(cache, tmp_path)
    flip_in_file(folder / FEATURES_FILE, "image_tokens")
    corrupt(folder / FEATURES_FILE, r"Tensor 'image_tokens' has sha256 .* damaged or changed", load=CachedFeatures)


@pytest.mark.parametrize("config", [MoPEConfig(init_weights=False), S3Config(init_weights=False)],
                         ids=["mope", "s3"])
def test_truncated_adapter_weights_are_named_when_loading(tmp_path, config):
    model = peft.get_peft_model(make_classifier(), config)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptFileError, match=rf"{weights}: cannot be read as safetensors.*copy or download"):
        peft.PeftModel.from_pretrained(make_classifier(), tmp_path)
    weights.write_bytes(data)
    reloaded = peft.PeftModel.from_pretrained(make_classifier(), tmp_path).eval()
    batch = make_batch()
    torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)
