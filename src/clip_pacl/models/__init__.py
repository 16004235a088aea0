from clip_pacl.models.clip import CLIP, CLIPOutput

__all__ = ["CLIP", "CLIPOutput"]
