"""Data for mmexperts: task loading (the offline kit's generators, Fashion-MNIST, the Hub, local folders), collation,
and MultiBench's two-modality feature pickles.

- ``loading``: ``load_task``, which sends a task name to its source;
- ``tasks``: task types, standard columns, ``TaskData`` and its bad-row ``DataReport``;
- sources: ``builtin`` (generated tasks, Fashion-MNIST, MultiBench), ``local`` (a folder of images and rows files,
  read by ``rows``), ``hub`` (Hub datasets; the known benchmarks are in ``catalog``);
- ``checks``: column inference and bad-row checks; ``collate``: batches of model tensors (image/text rows or
  feature sequences);
- readers: ``fashion`` (Fashion-MNIST's IDX files), ``multibench`` (MultiBench's feature pickles).
"""

from .collate import FeatureCollator, MultimodalCollator
from .loading import load_task
from .multibench import MULTIBENCH_DATASETS, load_multibench
from .tasks import DataReport, TaskData

__all__ = ["MULTIBENCH_DATASETS", "DataReport", "FeatureCollator", "MultimodalCollator", "TaskData", "load_multibench",
           "load_task"]
