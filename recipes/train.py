"""Train a mixture-of-experts adapter over frozen vision and text backbones.

    python recipes/train.py                                   # offline demo: configs/mope_synthetic.yaml
    python recipes/train.py --max_steps 200                   # the demo config, 200 steps
    python recipes/train.py --config none --method s3 ...     # TrainConfig's defaults, no config file
    accelerate launch recipes/train.py --config recipes/configs/mope_synthetic.yaml [--field value ...]

One precedence rule, lowest first: TrainConfig's defaults < the config file (--config FILE, by default
configs/mope_synthetic.yaml) < command-line flags. Every TrainConfig field (see `python recipes/train.py --help`, which
shows the demo config's values as defaults) can be set in the YAML file or on the command line.

Expected user errors (a bad flag value, a missing --config or --data_dir, a bad row with --strict_data, a checkpoint
that cannot be resumed...) print one line `error: ...` to stderr and exit with status 2, without a traceback.
"""

import sys
from pathlib import Path

from mmexperts.errors import MMExpertsError
from mmexperts.training import parse_config, train

DEMO_CONFIG = Path(__file__).parent / "configs" / "mope_synthetic.yaml"
# Errors a user fixes by changing the command line, the data or the output folder (not bugs): no traceback.
USER_ERRORS = (MMExpertsError, FileNotFoundError, NotADirectoryError, ConnectionError)


def main(argv: list[str]) -> int:
    try:
        train(parse_config(argv, default_config=DEMO_CONFIG))
    except USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
