"""Image search: an index of normalised image embeddings, searched by text or by example image."""

from clip_pacl.retrieval.index import ImageIndex, SearchHit, build_index, image_paths
from clip_pacl.retrieval.search import load_index_model, search_image, search_text

__all__ = ["ImageIndex", "SearchHit", "build_index", "image_paths", "load_index_model", "search_image", "search_text"]
