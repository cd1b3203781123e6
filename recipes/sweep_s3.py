"""S3 sweeps on two-modality feature data, either design of S3 (``--design``):

concepts (default): train an S3 adapter, prune it to each sparsity of a grid, fine-tune router and heads, evaluate.
paper: per seed and granularity chi, stage 1 (Specialization), stage 2 (Selection, routers only), then a linear probe
on fused_embeds at every keep ratio p (stage 3), beside the stage-1-only probe at p = 1.

    python recipes/sweep_s3.py                                          # offline: synthetic factor data, 3 seeds
    python recipes/sweep_s3.py --config recipes/configs/s3_factors_sweep.yaml --seeds 0,1 --output_dir out/sweep
    python recipes/sweep_s3.py --config recipes/configs/s3_paper_sweep.yaml    # the paper's granularity x keep ratio
    python recipes/sweep_s3.py --config recipes/configs/s3_paper_sweep.yaml --dataset multibench:mosi --data_dir DIR
    python recipes/sweep_s3.py --dataset multibench:sarcasm --data_dir /data/multibench

Every SweepConfig field (see `python recipes/sweep_s3.py --help`) can be set in the YAML file or on the command line.
Prints where it writes, shows progress per cell and per training step, and writes into --output_dir as it goes:
config.json, sweep.csv (a row per finished cell: (seed, sparsity), or paper (seed, granularity, keep ratio)), the plots
(concepts: accuracy_vs_sparsity.png and expert_usage.png after each seed; paper: accuracy_vs_keep_ratio.png after each
granularity), state/ (the trained adapters); at the end it prints the summary table. Running the same command again
after a kill resumes: finished cells are skipped. A folder holding a sweep of another config is refused;
--overwrite_output_dir starts over. Expected user errors print one line `error: ...` and exit with status 2.
"""

import sys

from mmexperts.errors import MMExpertsError
from mmexperts.training import parse_config
from mmexperts.training.sweep import SweepConfig, sparsity_sweep, summary_table

# Errors a user fixes by changing the command line, the data or the output folder (not bugs): one line, no traceback.
USER_ERRORS = (MMExpertsError, FileNotFoundError, NotADirectoryError, ConnectionError)


def main(argv: list[str]) -> int:
    try:
        config = parse_config(argv, config_class=SweepConfig)
        result = sparsity_sweep(config)
    except USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(summary_table(config, result))
    print("\n".join(f"{name}: {path}" for name, path in result["files"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
