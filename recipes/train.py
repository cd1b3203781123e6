"""Train a mixture-of-experts adapter over frozen vision and text backbones.

    python recipes/train.py                                   # offline demo: MoPE on synthetic visual entailment
    accelerate launch recipes/train.py --config recipes/configs/mope_synthetic.yaml [--field value ...]

Every TrainConfig field (see `python recipes/train.py --help`) can be set in the YAML file or on the command line.
"""

from mmexperts.training import parse_config, train

if __name__ == "__main__":
    train(parse_config())
