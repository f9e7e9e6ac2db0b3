"""OneRef: a modality-shared BEiT-3 transformer for referring expression comprehension (REC)
and segmentation (RES), pre-trained with Mask Referring Modeling (MRefM)."""

from oneref.config import ModelConfig, PRESETS, get_config
from oneref.info import info
from oneref.model import OneRef, VQKDTokenizer

__version__ = "0.1.0"

__all__ = ["ModelConfig", "OneRef", "PRESETS", "VQKDTokenizer", "get_config", "info",
           "__version__"]
