"""MoPE: Mixture of Prompt Experts (Jiang et al., arXiv 2403.10568) as a PEFT method."""

from .config import MoPEConfig
from .layer import MoPELayer
from .model import MoPEModel

__all__ = ["MoPEConfig", "MoPELayer", "MoPEModel"]
