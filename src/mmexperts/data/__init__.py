"""Data for mmexperts: task loading (synthetic, Hub, local), collation, the offline synthetic benchmark, and
two-modality feature data (the controllable factor generator and MultiBench's feature pickles)."""

from .collate import MultimodalCollator
from .factors import FACTOR_GROUPS, FactorSpec, build_factor_dataset
from .loading import DataReport, TaskData, load_task
from .multibench import MULTIBENCH_DATASETS, load_multibench

__all__ = ["FACTOR_GROUPS", "MULTIBENCH_DATASETS", "DataReport", "FactorSpec", "MultimodalCollator", "TaskData",
           "build_factor_dataset", "load_multibench", "load_task"]
