"""Alt-MoE / M3-JEPA (Lei et al., arXiv 2409.05929) as a PEFT method: a multi-directional MoE connector."""

from .config import AltMoEConfig
from .layer import AltMoEConnector, AltMoELayer, DirectionPrediction
from .model import AltMoEModel
from .outputs import AltMoEOutput, TokenFeatures

__all__ = ["AltMoEConfig", "AltMoEConnector", "AltMoELayer", "AltMoEModel", "AltMoEOutput", "DirectionPrediction",
           "TokenFeatures"]
