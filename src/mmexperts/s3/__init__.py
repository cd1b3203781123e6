"""S3: Specialization, Selection, Sparsification via mixture-of-experts (Choi & Kwak, ICML 2026) as a PEFT method:
the paper's design (per-modality MoE encoder layers, three stages) and the concept-expert design."""

from .config import S3Config
from .layer import S3Core, S3Layer, S3Output
from .model import S3Model
from .paper import MoEEncoder, PaperOutput

__all__ = ["MoEEncoder", "PaperOutput", "S3Config", "S3Core", "S3Layer", "S3Model", "S3Output"]
