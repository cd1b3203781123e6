"""Data for mmexperts: task loading (the offline kit's generators, Fashion-MNIST, the Hub, local folders), collation,
and MultiBench's two-modality feature pickles."""

from .collate import MultimodalCollator
from .loading import DataReport, TaskData, load_task
from .multibench import MULTIBENCH_DATASETS, load_multibench

__all__ = ["MULTIBENCH_DATASETS", "DataReport", "MultimodalCollator", "TaskData", "load_multibench", "load_task"]
