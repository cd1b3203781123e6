"""mmexperts: mixture-of-experts methods for multimodal learning as PEFT adapters.

Importing the package registers its PEFT types (``MOPE``, ``S3``, ``ALTMOE``) with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModel`` handle its adapters like built-in ones.
"""

from . import hub
from .altmoe import AltMoEConfig, AltMoEModel
from .hub import push_adapter_to_hub, write_model_card
from .modeling import (
                       FeatureEncoderConfig,
                       FeatureEncoderForClassification,
                       VisionTextClassificationConfig,
                       VisionTextClassifierOutput,
                       VisionTextModelForClassification,
)
from .mope import MoPEConfig, MoPELayer, MoPEModel
from .registry import MMExpertsPeftType, register_method
from .retrieval import SearchResult, VectorStore, retrieval_recall
from .s3 import S3Config, S3Layer, S3Model
from .towers import Tower, TowerDiscoveryError, find_towers

register_method(MMExpertsPeftType.MOPE, MoPEConfig, MoPEModel, prefix=MoPEModel.prefix)
register_method(MMExpertsPeftType.ALTMOE, AltMoEConfig, AltMoEModel, prefix=AltMoEModel.prefix)
register_method(MMExpertsPeftType.S3, S3Config, S3Model, prefix=S3Model.prefix)

__version__ = "0.1.0"

__all__ = [
    "AltMoEConfig", "AltMoEModel",
    "MMExpertsPeftType", "MoPEConfig", "MoPELayer", "MoPEModel", "Tower", "TowerDiscoveryError",
    "VisionTextClassificationConfig", "VisionTextClassifierOutput", "VisionTextModelForClassification",
    "find_towers", "hub", "push_adapter_to_hub", "register_method", "write_model_card",
    "SearchResult", "VectorStore", "retrieval_recall",
    "S3Config", "S3Layer", "S3Model", "FeatureEncoderConfig", "FeatureEncoderForClassification",
]
