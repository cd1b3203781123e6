"""Benchmark retrieval over pre-stored vectors: torch brute force vs FAISS exact, IVF and HNSW (VectorStore).

    python benchmarks/bench_retrieval.py [--n 200000] [--dim 256] [--queries 2000] [--threads 1] [--small]

Gallery: ``n`` synthetic embeddings in ``clusters`` clusters (their centres in related groups of ~10), each cluster
a centre plus a low-dimensional (``--intrinsic``) spread plus small isotropic noise, L2-normalised, so approximate
search has structure to exploit, as real embeddings do. Queries: randomly drawn gallery items plus Gaussian
noise, renormalised; each query's "source" item is its correct answer. All methods run in this process with the
same thread count (``torch.set_num_threads`` and ``faiss.omp_set_num_threads``) and answer all queries in one
batched call.

Reported per method: build time, queries/s (median of ``--repeats`` timed passes after one warm-up), Recall@10
against the exact top 10 (``|top10 & exact top10| / 10``, the usual ANN measure; exact = torch brute force), and
source Hit@10 (the query's source item in the top 10, counted with ``mmexperts.retrieval.recall_at_k``).
The IVF ``nprobe`` and HNSW ``ef_search`` settings are swept on the built indexes; the target for an approximate
setting is >= 0.95 of exact Recall@10 and of exact Hit@10 at >= 5x the throughput of the FAISS exact search.
Results go to stdout and to ``benchmarks/results/bench_retrieval.md`` (``bench_retrieval_small.md`` with --small).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from mmexperts.retrieval import VectorStore, recall_at_k

from harness import environment, markdown_table, time_calls

HERE = Path(__file__).resolve().parent
K = 10
RECALL_TARGET, SPEEDUP_TARGET = 0.95, 5.0


def make_data(n: int, dim: int, clusters: int, intrinsic: int, spread: float, queries: int, noise: float,
              seed: int):
    """Clustered unit vectors and noisy copies of randomly chosen ones (with the chosen rows as ground truth).

    A point is a unit cluster centre, plus a ``spread``-sized offset in the cluster's own ``intrinsic``-dimensional
    subspace, plus isotropic noise of norm 0.1; queries add isotropic noise of norm ``noise``.
    """
    generator = torch.Generator().manual_seed(seed)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    groups = unit(torch.randn(max(1, clusters // 10), dim, generator=generator))  # clusters come in related groups
    group = torch.randint(0, len(groups), (clusters,), generator=generator)
    centres = unit(groups[group] + unit(torch.randn(clusters, dim, generator=generator)))
    bases = torch.linalg.qr(torch.randn(clusters, dim, intrinsic, generator=generator)).Q.transpose(1, 2)
    member = torch.randint(0, clusters, (n,), generator=generator)
    gallery = torch.empty(n, dim)
    for start in range(0, n, 20000):
        rows = member[start:start + 20000]
        coords = torch.randn(len(rows), 1, intrinsic, generator=generator) * (spread / intrinsic ** 0.5)
        iso = torch.randn(len(rows), dim, generator=generator) * (0.1 / dim ** 0.5)
        gallery[start:start + 20000] = centres[rows] + (coords @ bases[rows])[:, 0] + iso
    gallery = unit(gallery)
    source = torch.randint(0, n, (queries,), generator=generator)
    query = gallery[source] + torch.randn(queries, dim, generator=generator) * (noise / dim ** 0.5)
    return gallery, unit(query), source


def torch_topk(gallery: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Exact top-k by matmul + topk, in query chunks (bounded memory)."""
    return torch.cat([(queries[i:i + chunk] @ gallery.T).topk(k, dim=1).indices
                      for i in range(0, len(queries), chunk)])


def measure(name, settings, build_s, fn, repeats, num_queries, exact, source):
    outputs = []
    seconds = statistics.median(time_calls(lambda: outputs.append(fn()), repeats, warmup=1))
    positions = outputs[-1].numpy()
    overlap = float(np.mean([len(set(a) & set(b)) for a, b in zip(positions.tolist(), exact.tolist())]) / K)
    hit = recall_at_k(positions == source[:, None], k_values=(K,))[f"recall@{K}"]
    row = {"method": name, "settings": settings, "build_s": build_s, "qps": num_queries / seconds,
           "recall10": overlap, "hit10": hit}
    print(f"{name:<14} {settings:<28} build {build_s:7.2f} s   {row['qps']:10.0f} q/s   "
          f"recall@10 {overlap:.4f}   hit@10 {hit:.4f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--intrinsic", type=int, default=16)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=0.7, help="within-cluster spread (norm)")
    parser.add_argument("--noise", type=float, default=0.5, help="query noise norm (gallery vectors are unit)")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true",
                        help="20k vectors in 20 clusters, 128 cells, 500 queries: a quick check")
    args = parser.parse_args()
    if args.small:
        args.n, args.clusters, args.nlist, args.queries = 20_000, 20, 128, 500
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    started = time.time()

    gallery, queries, source = make_data(args.n, args.dim, args.clusters, args.intrinsic, args.spread, args.queries,
                                         args.noise, args.seed)
    source = source.numpy()
    print(f"gallery {args.n} x {args.dim}, {args.queries} queries, {args.threads} thread(s)", flush=True)
    exact = torch_topk(gallery, queries, K).numpy()
    rows = [measure("torch", "matmul + topk", 0.0, lambda: torch_topk(gallery, queries, K), args.repeats,
                    args.queries, exact, source)]

    def build(**kwargs):
        start = time.perf_counter()
        store = VectorStore(gallery, **kwargs)
        return store, time.perf_counter() - start

    flat, seconds = build(index_type="flat")
    rows.append(measure("faiss flat", "IndexFlatIP", seconds, lambda store=flat: store.search(queries, K).positions,
                        args.repeats, args.queries, exact, source))
    del flat
    ivf, seconds = build(index_type="ivf", nlist=args.nlist, nprobe=args.nprobe[0])
    for nprobe in args.nprobe:
        ivf.set_search_params(nprobe=nprobe)
        rows.append(measure("faiss ivf", f"nlist={args.nlist} nprobe={nprobe}", seconds,
                            lambda store=ivf: store.search(queries, K).positions, args.repeats, args.queries, exact,
                            source))
    del ivf
    hnsw, seconds = build(index_type="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
    for ef in args.ef_search:
        hnsw.set_search_params(ef_search=ef)
        rows.append(measure("faiss hnsw", f"M={args.hnsw_m} efC={args.ef_construction} efS={ef}", seconds,
                            lambda store=hnsw: store.search(queries, K).positions, args.repeats, args.queries, exact,
                            source))
    del hnsw

    exact_row = rows[1]
    for row in rows:
        row["speedup"] = row["qps"] / exact_row["qps"]
        row["recall_ratio"] = row["recall10"] / exact_row["recall10"]
        row["hit_ratio"] = row["hit10"] / exact_row["hit10"]
        row["meets"] = (row["method"] in ("faiss ivf", "faiss hnsw") and row["speedup"] >= SPEEDUP_TARGET
                        and min(row["recall_ratio"], row["hit_ratio"]) >= RECALL_TARGET)
    write_report(args, rows, time.time() - started)


def write_report(args, rows, total_s) -> None:
    lines = [
        "# Retrieval benchmark: torch brute force vs FAISS exact, IVF, HNSW",
        "",
        f"Command: `python benchmarks/bench_retrieval.py{' --small' if args.small else ''}` "
        f"(n={args.n}, dim={args.dim}, clusters={args.clusters}, intrinsic dim={args.intrinsic}, "
        f"spread={args.spread}, queries={args.queries}, query noise={args.noise}, threads={args.threads}, k={K}, "
        f"seed={args.seed}).",
        "",
        "Queries/s: all queries in one batched call, median of "
        f"{args.repeats} passes after a warm-up. Recall@10: overlap with the exact top 10. Hit@10: the query's source "
        "item in the top 10. Ratios are against FAISS exact (`IndexFlatIP`). **bold** = meets the target "
        f"(>= {RECALL_TARGET} of exact Recall@10 and Hit@10 at >= {SPEEDUP_TARGET:g}x its throughput).",
        "",
        *markdown_table(
            ["method", "settings", "build s", "queries/s", "x exact", "Recall@10", "Hit@10", "/ exact Hit@10"],
            [[f"**{row['method']}**" if row["meets"] else row["method"], row["settings"], f"{row['build_s']:.1f}",
              f"{row['qps']:,.0f}", f"{row['speedup']:.1f}", f"{row['recall10']:.4f}", f"{row['hit10']:.4f}",
              f"{row['hit_ratio']:.3f}"] for row in rows], right=range(2, 8), compact=True),
    ]
    best = {}
    for row in rows:
        if row["meets"] and row["qps"] > best.get(row["method"], {"qps": 0})["qps"]:
            best[row["method"]] = row
    lines += ["", "Fastest setting meeting the target per approximate index: " + (
        "; ".join(f"{m} {r['settings']}: {r['speedup']:.1f}x exact, Recall@10 {r['recall10']:.3f}, Hit@10 ratio "
                  f"{r['hit_ratio']:.3f}" for m, r in best.items()) or "none") + ".", ""]
    lines += [f"Environment: {environment(extra={'faiss': faiss.__version__, 'numpy': np.__version__})}. "
              f"Total run {total_s:.0f} s.", ""]
    text = "\n".join(lines)
    print("\n" + text)
    out = HERE / "results" / ("bench_retrieval_small.md" if args.small else "bench_retrieval.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
