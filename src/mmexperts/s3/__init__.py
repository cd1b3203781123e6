"""S3: Specialization, Selection, Sparsification via concept experts (Choi & Kwak, ICML 2026) as a PEFT method."""

from .config import S3Config
from .layer import S3Core, S3Layer, S3Output
from .model import S3Model

__all__ = ["S3Config", "S3Core", "S3Layer", "S3Model", "S3Output"]
