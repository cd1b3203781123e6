"""The training loop shared by every method (Accelerate), its configuration and helpers."""

from .config import TrainConfig, parse_config
from .loop import Trainer, TrainingState, check_process_group, compute_metrics, list_checkpoints, train
from .methods import METHODS, method_config

__all__ = ["METHODS", "TrainConfig", "Trainer", "TrainingState", "check_process_group", "compute_metrics",
           "list_checkpoints", "method_config", "parse_config", "train"]
