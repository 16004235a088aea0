"""A random tiny Hugging Face CLIP directory (weights, CLIP BPE tokenizer, a processor that keeps the pixels).

Its random image-text cosines are spread over both signs, unlike the random `tiny` preset's, so scores computed
with it are not all clamped to the same value.
"""

import gzip
import json
from importlib import resources
from pathlib import Path

import torch
import transformers

from clip_pacl.tokenizer import _load_bpe


def write_hf_clip(path: Path, image_size: int) -> None:
    """A random tiny transformers CLIPModel with the CLIP BPE tokenizer and a processor that keeps the pixels."""
    torch.manual_seed(0)
    text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, vocab_size=49408)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)) \
        .save_pretrained(path)
    lines = gzip.decompress((resources.files("clip_pacl") / "assets" / "bpe_simple_vocab_16e6.txt.gz").read_bytes())
    merges = lines.decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = _load_bpe().get_vocab()  # open_clip spells the special tokens differently from OpenAI / HF
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    image_processor = transformers.CLIPImageProcessor(do_resize=False, do_center_crop=False)  # pixels as given
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
