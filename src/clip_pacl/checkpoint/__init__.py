from clip_pacl.checkpoint.io import load, save

__all__ = ["load", "save"]
