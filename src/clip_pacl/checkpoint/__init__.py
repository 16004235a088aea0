from clip_pacl.checkpoint.export import export, export_hf, export_open_clip
from clip_pacl.checkpoint.files import read_weights
from clip_pacl.checkpoint.io import Source, load, load_with_source, save

__all__ = ["Source", "export", "export_hf", "export_open_clip", "load", "load_with_source", "read_weights", "save"]
