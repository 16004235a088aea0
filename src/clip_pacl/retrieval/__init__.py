"""Image search: an index of normalised image embeddings, searched by text or by example image."""

from clip_pacl.retrieval.build import build_index, image_paths
from clip_pacl.retrieval.search import load_index_model, search_image, search_text
from clip_pacl.retrieval.store import ImageIndex, SearchHit

__all__ = ["ImageIndex", "SearchHit", "build_index", "image_paths", "load_index_model", "search_image", "search_text"]
