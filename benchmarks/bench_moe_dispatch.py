"""Benchmark ExpertMLPs' sparse top-k dispatch against dense dispatch (every expert on every token), CPU.

    python benchmarks/bench_moe_dispatch.py [--experts 12] [--top-k 4] [--tokens 4096] [--hidden 1024] [--reps 5]

One repetition = forward + backward of ``ExpertMLPs`` on (tokens x hidden) inputs with top-k routing weights from a
softmax over random logits. Sparse and dense alternate within every round (the order flips each round), so machine
noise hits both alike. Reported: median seconds per repetition (with min-max), the ratio of medians and the median
of per-round paired ratios, against the ideal k/K. Results go to stdout and
``benchmarks/results/bench_moe_dispatch.md``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from mmexperts.moe import ExpertMLPs, top_k_weights

from harness import environment, markdown_table, median_ratio, paired_ratio, time_rounds

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=12)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--expert-hidden", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=str(HERE / "results" / "bench_moe_dispatch.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = {mode: ExpertMLPs(args.experts, args.hidden, args.expert_hidden, dispatch=mode)
                for mode in ("sparse", "dense")}
    variants["dense"].load_state_dict(variants["sparse"].state_dict())
    x = torch.randn(args.tokens, args.hidden, requires_grad=True)
    weights = top_k_weights(torch.randn(args.tokens, args.experts).softmax(-1), args.top_k)
    with torch.no_grad():  # both modes compute the same function
        torch.testing.assert_close(variants["sparse"](x, weights), variants["dense"](x, weights), atol=1e-4, rtol=1e-4)

    def clear_grads(mode: str) -> None:
        variants[mode].zero_grad(set_to_none=True)
        x.grad = None

    steps = {mode: lambda experts=experts: experts(x, weights).pow(2).mean().backward()  # one forward + backward
             for mode, experts in variants.items()}
    times = time_rounds(steps, args.reps, warmup=1, setup=clear_grads)
    median = {mode: statistics.median(values) for mode, values in times.items()}
    ratio = median_ratio(times["sparse"], times["dense"])
    paired = paired_ratio(times["sparse"], times["dense"])
    ideal = args.top_k / args.experts
    bound = ideal + 0.15
    lines = [
        "# ExpertMLPs dispatch: sparse top-k vs dense",
        "",
        f"K={args.experts}, k={args.top_k}, {args.tokens} tokens, hidden {args.hidden}, expert hidden "
        f"{args.expert_hidden}, fp32, forward + backward, {args.reps} interleaved repetitions after one warm-up.",
        f"Environment: {environment()}.",
        "",
        *markdown_table(["dispatch", "median s", "min-max s"],
                        [[mode, f"{median[mode]:.3f}", f"{min(times[mode]):.3f}-{max(times[mode]):.3f}"]
                         for mode in times]),
        "",
        f"- sparse / dense (ratio of medians): **{ratio:.3f}**; median paired ratio {paired:.3f}",
        f"- ideal k/K = {ideal:.3f}; target <= k/K + 0.15 = {bound:.3f}: {'met' if ratio <= bound else 'NOT met'}",
    ]
    report = "\n".join(lines)
    print(report)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(report + "\n")


if __name__ == "__main__":
    main()
