"""mmexperts: mixture-of-experts methods for multimodal learning as PEFT adapters.

Importing the package registers its PEFT types (``MOPE``, ``S3``, ``ALTMOE``) with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModel`` handle its adapters like built-in ones.
"""

from . import hub
from .hub import push_adapter_to_hub, write_model_card
from .modeling import VisionTextClassificationConfig, VisionTextClassifierOutput, VisionTextModelForClassification
from .mope import MoPEConfig, MoPELayer, MoPEModel
from .registry import MMExpertsPeftType, register_method
from .retrieval import SearchResult, VectorStore, retrieval_recall
from .towers import Tower, TowerDiscoveryError, find_towers

register_method(MMExpertsPeftType.MOPE, MoPEConfig, MoPEModel, prefix=MoPEModel.prefix)

__version__ = "0.1.0"

__all__ = [
    "MMExpertsPeftType", "MoPEConfig", "MoPELayer", "MoPEModel", "Tower", "TowerDiscoveryError",
    "VisionTextClassificationConfig", "VisionTextClassifierOutput", "VisionTextModelForClassification",
    "find_towers", "hub", "push_adapter_to_hub", "register_method", "write_model_card",
    "SearchResult", "VectorStore", "retrieval_recall",
]
