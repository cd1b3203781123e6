"""The FAISS vector store (exact and approximate search, save/load without re-encoding) and retrieval Recall@K."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmexperts import SearchResult, VectorStore, retrieval_recall
from mmexperts.retrieval import encode_batches, recall_at_k

from conftest import make_batch, make_clip


def clustered(count: int = 2000, dim: int = 16, clusters: int = 20, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    members = torch.randint(0, clusters, (count,), generator=generator)
    return centres[members] + 0.3 * torch.randn(count, dim, generator=generator)


def brute_force(gallery: torch.Tensor, queries: torch.Tensor, k: int):
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(gallery, dim=1).T
    return sims.topk(k, dim=1)


def test_exact_search_equals_torch_topk():
    gallery, queries = clustered(), clustered(count=50, seed=1)
    ids = [f"item-{i}" for i in range(len(gallery))]
    store = VectorStore(gallery, ids)
    result = store.search(queries, k=7)
    expected = brute_force(gallery, queries, 7)
    assert isinstance(result, SearchResult)
    assert torch.equal(result.positions, expected.indices)
    torch.testing.assert_close(result.scores, expected.values, atol=1e-5, rtol=0)
    assert result.ids.shape == (50, 7) and result.ids[3, 0] == ids[int(expected.indices[3, 0])]
    # vectors are stored L2-normalised, so a gallery item finds itself with score 1
    assert torch.allclose(store.vectors.norm(dim=1), torch.ones(len(gallery)))
    self_hit = store.search(gallery[:5] * 3.0, k=1)
    assert self_hit.positions[:, 0].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(self_hit.scores[:, 0], torch.ones(5))


def test_approximate_indexes_agree_with_exact_search():
    gallery, queries = clustered(), clustered(count=100, seed=1)
    exact = brute_force(gallery, queries, 10).indices
    ivf = VectorStore(gallery, index_type="ivf", nlist=16, nprobe=4)
    hnsw = VectorStore(gallery, index_type="hnsw", hnsw_m=16, ef_search=64)
    for store in (ivf, hnsw):
        found = store.search(queries, k=10).positions
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), exact.tolist())])
        assert overlap > 0.9, (store, overlap)
    # scanning every IVF cell is an exhaustive search
    ivf.set_search_params(nprobe=16)
    assert torch.equal(ivf.search(queries, k=10).positions, exact)
    assert ivf.params == {"nlist": 16, "nprobe": 16}


class CountingEncoder:
    """Stands in for tower + connector: a fixed projection, counting calls and recording the keys it saw."""

    def __init__(self, dim_in: int = 12, dim_out: int = 8):
        self.weight = torch.randn(dim_in, dim_out, generator=torch.Generator().manual_seed(3))
        self.calls, self.keys = 0, set()

    def __call__(self, batch: dict) -> torch.Tensor:
        self.calls += 1
        self.keys |= set(batch)
        return batch["features"] @ self.weight


def feature_batches(features: torch.Tensor, batch_size: int = 16) -> DataLoader:
    rows = [{"features": row, "image_id": 1000 + i // 2} for i, row in enumerate(features)]  # two rows per id
    return DataLoader(rows, batch_size=batch_size)


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_save_load_answers_without_reencoding(tmp_path, index_type):
    features = torch.randn(60, 12, generator=torch.Generator().manual_seed(0))
    loader = feature_batches(features)
    encoder = CountingEncoder()
    store = VectorStore.from_encoder(encoder, loader, id_key="image_id", progress=False, index_type=index_type)
    assert encoder.calls == len(loader) and encoder.keys == {"features"}  # the id column is not passed on
    assert len(store) == 60 and store.dim == 8 and store.ids[:4].tolist() == [1000, 1000, 1001, 1001]
    queries = torch.randn(9, 8, generator=torch.Generator().manual_seed(1))
    before = store.search(queries, k=5)

    store.save(tmp_path / "store")
    store.save(tmp_path / "store")  # overwriting an existing store is atomic and leaves no staging folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    config = json.loads((tmp_path / "store" / "store.json").read_text())
    assert (config["dim"], config["metric"], config["index_type"], config["count"]) == (8, "cosine", index_type, 60)
    assert config["ids"] == store.ids.tolist()

    calls = encoder.calls
    loaded = VectorStore.load(tmp_path / "store")
    after = loaded.search(queries, k=5)
    assert encoder.calls == calls
    assert loaded.index_type == index_type and loaded.params == store.params
    assert torch.equal(loaded.vectors, store.vectors)
    assert torch.equal(after.positions, before.positions) and torch.equal(after.scores, before.scores)
    assert np.array_equal(after.ids, before.ids)
    # queries through an encode function; query ids come from the same id column
    encoded = loaded.search_encoded(encoder, feature_batches(features[:6]), k=2, id_key="image_id",
                                    progress=False)
    assert encoded.query_ids.tolist() == [1000, 1000, 1001, 1001, 1002, 1002]
    assert encoded.positions[:, 0].tolist() == list(range(6))  # same features as the gallery's first rows


def test_clip_gallery_and_padded_text_queries():
    clip = make_clip()
    batches = [{**make_batch(4, seed=s, with_labels=False), "image_id": torch.arange(4 * s, 4 * s + 4)}
               for s in range(3)]
    images = VectorStore.from_encoder(lambda b: clip(**b).image_embeds, batches, id_key="image_id", progress=False)
    assert (len(images), images.dim) == (12, clip.config.projection_dim)
    # images query their own gallery: each finds itself first
    again = images.search_encoded(lambda b: clip(**b).image_embeds, batches, k=3, id_key="image_id", progress=False)
    assert np.array_equal(again.ids[:, 0], again.query_ids)
    texts = images.search_encoded(lambda b: clip(**b).text_embeds, batches, k=3, progress=False)
    assert texts.scores.shape == (12, 3) and bool((texts.scores[:, :-1] >= texts.scores[:, 1:]).all())
    with pytest.raises(ValueError, match=r"dimension 32 but the store holds 16-d vectors.*same model"):
        images.search_encoded(lambda b: clip.vision_model(pixel_values=b["pixel_values"]).pooler_output, batches,
                              progress=False)


def hand_built_stores(index_type: str = "flat"):
    """3 images and 5 captions with known ranks (see the test for the expected hits)."""
    images = VectorStore(torch.eye(3), [10, 20, 30], index_type=index_type)
    captions = torch.tensor([[1.0, 0.2, 0.0],    # image 10; nearest image 10 (t2i rank 1)
                             [0.0, 1.0, 0.1],    # image 10; ranks images 20, 30, 10 (rank 3)
                             [0.1, 0.05, 1.0],   # image 20; ranks 30, 10, 20 (rank 3)
                             [0.0, 0.5, 1.0],    # image 30; rank 1
                             [1.0, 0.0, 0.5]])   # image 30; ranks 10, 30 (rank 2)
    return images, VectorStore(captions, [10, 10, 20, 30, 30], index_type=index_type)


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_multi_caption_recall_hand_built(index_type):
    images, captions = hand_built_stores(index_type)
    result = retrieval_recall(images, captions, k_values=(1, 2, 3))
    # image -> text: image 10's best caption ranks 1st, image 20's only caption 4th, image 30's 2nd
    # text -> image: caption ranks 1, 3, 3, 1, 2
    expected = {"i2t_r1": 100 / 3, "i2t_r2": 200 / 3, "i2t_r3": 200 / 3, "t2i_r1": 40.0, "t2i_r2": 60.0,
                "t2i_r3": 100.0}
    assert result == pytest.approx({**expected, "rsum": sum(expected.values())})
    # pairwise: first caption per image only (captions 0, 2, 3): i2t ranks 1, 3, 2; t2i ranks 1, 3, 1
    pairwise = retrieval_recall(images, captions, k_values=(1, 2, 3), protocol="pairwise")
    expected = {"i2t_r1": 100 / 3, "i2t_r2": 200 / 3, "i2t_r3": 100.0, "t2i_r1": 200 / 3, "t2i_r2": 200 / 3,
                "t2i_r3": 100.0}
    assert pairwise == pytest.approx({**expected, "rsum": sum(expected.values())})
    # a JEPA-style route: image queries that predict each image's first caption exactly
    predicted = captions.vectors[[0, 2, 3]]
    routed = retrieval_recall(images, captions, image_queries=predicted, k_values=(1, 2, 3))
    assert routed["i2t_r1"] == 100.0 and routed["t2i_r1"] == 40.0


def test_recall_at_k_from_ranked_hits_matches_direct_count():
    hits = np.random.default_rng(0).random((300, 10)) < 0.15
    expected = {f"recall@{k}": float(hits[:, :k].any(axis=1).mean()) for k in (1, 5, 10)}
    assert recall_at_k(hits) == pytest.approx(expected)
    assert recall_at_k(np.zeros((4, 3), dtype=bool), k_values=(1, 3)) == {"recall@1": 0.0, "recall@3": 0.0}
    with pytest.raises(ValueError, match="k=5 is larger than the 3 results retrieved"):
        recall_at_k(np.ones((2, 3), dtype=bool), k_values=(1, 5))


def test_clear_errors():
    gallery = clustered(count=100)
    store = VectorStore(gallery)
    with pytest.raises(ValueError, match=r"dimension 8 but the store holds 16-d vectors"):
        store.search(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"k=101 is larger than the gallery of 100 vectors; use k <= 100"):
        store.search(gallery[:2], k=101)
    with pytest.raises(ValueError, match=r"k=0 must be a positive integer"):
        store.search(gallery[:2], k=0)
    bad = gallery[:4].clone()
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN/inf\) in rows \[2\]"):
        store.search(bad)
    with pytest.raises(ValueError, match=r"non-finite.*rows \[2\]"):
        VectorStore(bad)
    with pytest.raises(ValueError, match=r"rows \[0\] are all zeros"):
        VectorStore(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"gallery vectors is empty \(shape \(0, 16\)\)"):
        VectorStore(torch.empty(0, 16))
    with pytest.raises(ValueError, match=r"batches yielded nothing to encode"):
        VectorStore.from_encoder(CountingEncoder(), [], progress=False)
    with pytest.raises(ValueError, match=r"unknown index_type 'ivfpq'; expected one of flat, ivf, hnsw"):
        VectorStore(gallery, index_type="ivfpq")
    with pytest.raises(ValueError, match=r"nlist=500 k-means cells need at least 500 gallery vectors.*has 100"):
        VectorStore(gallery, index_type="ivf", nlist=500)
    with pytest.raises(ValueError, match=r"nprobe=9 must be between 1 and nlist=2"):
        VectorStore(gallery, index_type="ivf", nlist=2, nprobe=9)
    with pytest.raises(ValueError, match=r"ef_search applies to index_type='hnsw', this store is 'flat'"):
        store.set_search_params(ef_search=10)
    with pytest.raises(ValueError, match=r"got 3 ids for 100 vectors"):
        VectorStore(gallery, [1, 2, 3])
    with pytest.raises(TypeError, match=r"all integers or all strings, got \['int', 'str'\]"):
        VectorStore(gallery[:2], [1, "a"])
    with pytest.raises(TypeError, match=r"must return a \(batch, dim\) tensor, got tuple.*image_embeds"):
        encode_batches(lambda b: (b,), [torch.ones(2, 3)], progress=False)
    with pytest.raises(KeyError, match=r"id_key='image_id' is not in the batch \(found \['features'\]\)"):
        encode_batches(CountingEncoder(), [{"features": torch.ones(2, 12)}], id_key="image_id", progress=False)


def test_retrieval_errors(tmp_path):
    images, captions = hand_built_stores()
    with pytest.raises(ValueError, match=r"unknown protocol 'karpathy'; expected one of multi_caption, pairwise"):
        retrieval_recall(images, captions, protocol="karpathy")
    with pytest.raises(ValueError, match=r"k=10 is larger than the text -> image gallery of 3 items"):
        retrieval_recall(images, captions)
    with pytest.raises(ValueError, match=r"images without a caption \[40\]"):
        retrieval_recall(VectorStore(torch.eye(4), [10, 20, 30, 40]), captions, k_values=(1,))
    with pytest.raises(ValueError, match=r"image ids must be unique, \[10\] repeat"):
        retrieval_recall(VectorStore(torch.eye(3), [10, 10, 20]), captions, k_values=(1,))
    with pytest.raises(ValueError, match=r"image_queries has 2 rows but its store has 3"):
        retrieval_recall(images, captions, image_queries=torch.eye(3)[:2], k_values=(1,))
    with pytest.raises(FileNotFoundError, match=r"not a saved VectorStore: missing vectors.safetensors, store.json"):
        VectorStore.load(tmp_path)
