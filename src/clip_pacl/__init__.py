"""clip-pacl: CLIP training, conversion, evaluation and serving, with PACL open-vocabulary segmentation."""

from clip_pacl.checkpoint import load, save
from clip_pacl.config import CLIPConfig, TextConfig, VisionConfig
from clip_pacl.models import CLIP
from clip_pacl.models.pacl import PACL, PACLConfig
from clip_pacl.models.quantize import quantize_int8
from clip_pacl.tokenizer import get_tokenizer, tokenize
from clip_pacl.transforms import image_transform

__all__ = [
    "CLIP", "PACL", "CLIPConfig", "PACLConfig", "TextConfig", "VisionConfig",
    "get_tokenizer", "image_transform", "load", "quantize_int8", "save", "tokenize",
]
__version__ = "0.1.0"
