"""Benchmark glue for the S3 paper protocol (``mmexperts.training.sweep.three_stages`` and
``mmexperts.s3.protocol``): the S3 benchmarks' rows, one per (seed, model, keep ratio)."""

from __future__ import annotations

STAGE_NAMES = {"specialization": "specialization only", "s3": "S3 (three stages)"}


def named_rows(stages: dict[str, list[dict]], seed: int, prefix: str) -> list[dict]:
    """``three_stages``'s rows as ``{"seed", "model": "{prefix}: specialization only" or "{prefix}: S3 (three
    stages)", "keep_ratio", "kept_pairs", "test_accuracy"}``."""
    return [{"seed": seed, "model": f"{prefix}: {STAGE_NAMES[stage]}", **row}
            for stage, rows in stages.items() for row in rows]
