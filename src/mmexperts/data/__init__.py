"""Data for mmexperts: task loading (synthetic, Hub, local), collation, and the offline synthetic benchmark."""

from .collate import MultimodalCollator
from .loading import DataReport, TaskData, load_task

__all__ = ["DataReport", "MultimodalCollator", "TaskData", "load_task"]
