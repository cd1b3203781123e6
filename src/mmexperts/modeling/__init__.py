"""Base models for mmexperts' adapters, one model per module as in transformers, each registered with ``AutoConfig``
and ``AutoModel``:

- ``vision_text``: ``VisionTextModelForClassification``, two ``AutoModel`` towers (image, text) and a head;
- ``feature_encoder``: ``FeatureEncoderForClassification``, two small transformer towers over pre-extracted feature
  sequences and a head;
- ``outputs``: their outputs, with the ``aux_loss`` and ``routing_weights`` fields the adapters fill.
"""

from .feature_encoder import FeatureBlock, FeatureEncoderConfig, FeatureEncoderForClassification, FeatureTower
from .outputs import FeatureClassifierOutput, VisionTextClassifierOutput
from .vision_text import CLASSIFIER_INPUTS, VisionTextClassificationConfig, VisionTextModelForClassification

__all__ = ["CLASSIFIER_INPUTS", "FeatureBlock", "FeatureClassifierOutput", "FeatureEncoderConfig",
           "FeatureEncoderForClassification", "FeatureTower", "VisionTextClassificationConfig",
           "VisionTextClassifierOutput", "VisionTextModelForClassification"]
