"""clip-pacl: CLIP training, conversion, evaluation and serving, with PACL open-vocabulary segmentation."""

from clip_pacl.checkpoint import load, save
from clip_pacl.config import CLIPConfig, TextConfig, VisionConfig
from clip_pacl.models import CLIP

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "load", "save"]
__version__ = "0.1.0"
