"""The training loop shared by every method (Accelerate), its configuration and helpers."""

from ..metrics import compute_metrics
from .checkpoint import TrainingState, latest_checkpoint, list_checkpoints, verify_checkpoint
from .cli import parse_config
from .config import TrainConfig
from .loop import Trainer, check_process_group, train
from .methods import METHODS, method_config

__all__ = ["METHODS", "TrainConfig", "Trainer", "TrainingState", "check_process_group", "compute_metrics",
           "latest_checkpoint", "list_checkpoints", "verify_checkpoint", "method_config", "parse_config", "train"]
