"""S3 sparsity sweep: train an S3 adapter, prune it to each sparsity of a grid, fine-tune router and heads, evaluate.

    python recipes/sweep_s3.py                                          # offline: synthetic factor data, 3 seeds
    python recipes/sweep_s3.py --config recipes/configs/s3_factors_sweep.yaml --seeds 0,1 --output_dir out/sweep
    python recipes/sweep_s3.py --dataset multibench:sarcasm --data_dir /data/multibench

Every SweepConfig field (see `python recipes/sweep_s3.py --help`) can be set in the YAML file or on the command line.
Prints where it writes, shows progress per cell (seed, sparsity) and per training step, and writes into --output_dir
as it goes: config.json, sweep.csv (a row per finished cell), accuracy_vs_sparsity.png and expert_usage.png (after each
seed), state/ (each seed's trained adapter); at the end it prints the summary table. Running the same command again
after a kill resumes: finished cells are skipped. A folder holding a sweep of another config is refused;
--overwrite_output_dir starts over. Expected user errors print one line `error: ...` and exit with status 2.
"""

import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from mmexperts.errors import ConfigError, MMExpertsError
from mmexperts.training.sweep import SweepConfig, sparsity_sweep

# Errors a user fixes by changing the command line, the data or the output folder (not bugs): one line, no traceback.
USER_ERRORS = (MMExpertsError, FileNotFoundError, NotADirectoryError, ConnectionError)


def parse(argv: list[str]) -> SweepConfig:
    """``--config file.yaml`` sets defaults; any ``--field value`` overrides them."""
    parser = HfArgumentParser(SweepConfig)
    parser.add_argument("--config", type=str, default=None, help="YAML file with SweepConfig fields.")
    if "--config" in argv:
        path = Path(argv[argv.index("--config") + 1])
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file.")
        values = yaml.safe_load(path.read_text()) or {}
        known = set(SweepConfig.__dataclass_fields__)
        if set(values) - known:
            raise ConfigError("config", f"{path}: unknown fields {sorted(set(values) - known)}; valid fields: "
                                        f"{sorted(known)}.")
        parser.set_defaults(**{k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in values.items()})
    config, _ = parser.parse_args_into_dataclasses(args=argv)
    return config


def main(argv: list[str]) -> int:
    try:
        result = sparsity_sweep(parse(argv))
    except USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print("| sparsity | pruned | test accuracy (mean ± std) | seeds |\n| --- | --- | --- | --- |")
    for row in result["summary"]:
        print(f"| {row['sparsity']:.3f} | {row['pruned']} | {row['mean']:.4f} ± {row['std']:.4f} | {row['seeds']} |")
    print("\n".join(f"{name}: {path}" for name, path in result["files"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
