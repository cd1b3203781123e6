"""Train a mixture-of-experts adapter over frozen vision and text backbones.

    python recipes/train.py                                   # offline demo: configs/mope_synthetic.yaml
    accelerate launch recipes/train.py --config recipes/configs/mope_synthetic.yaml [--field value ...]

Every TrainConfig field (see `python recipes/train.py --help`) can be set in the YAML file or on the command line.
"""

import sys
from pathlib import Path

from mmexperts.training import parse_config, train

DEMO_CONFIG = Path(__file__).parent / "configs" / "mope_synthetic.yaml"

if __name__ == "__main__":
    train(parse_config(sys.argv[1:] or ["--config", str(DEMO_CONFIG)]))
