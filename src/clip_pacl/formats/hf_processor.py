"""The Hugging Face processor files of an exported CLIP: what `CLIPProcessor.from_pretrained(DIR)` and
`transformers.pipeline("zero-shot-image-classification", model=DIR)` read beside the weights.

`preprocessor_config.json` describes CLIP's eval transform (`transforms.py`: shortest side to the image size,
bicubic, centre crop, OpenAI mean/std). The tokenizer files hold CLIP's BPE (`tokenizer.py`) with Hugging Face's
spelling of the special tokens: `vocab.json` + `merges.txt` (the slow `CLIPTokenizer`) and `tokenizer.json` (the
fast one), built with the `tokenizers` library as transformers' own `CLIPConverter` builds it, so transformers is
not needed to write them. The model's context length is the tokenizer's `model_max_length`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from clip_pacl.atomic import atomic_write
from clip_pacl.checkpoint.files import save_json
from clip_pacl.config import CLIPConfig
from clip_pacl.tokenizer import EOT_ID, SOT_ID, SPLIT_PATTERN, bpe_vocab_and_merges
from clip_pacl.transforms import OPENAI_MEAN, OPENAI_STD

HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as HF image processors record `resample`
PROCESSOR_FILES = ("preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def image_processor_config(config: CLIPConfig) -> dict:
    size = config.vision.image_size
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
            "do_resize": True, "size": {"shortest_edge": size}, "resample": BICUBIC,
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD), "do_convert_rgb": True}


def fast_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """CLIP's BPE as transformers' `CLIPConverter` builds CLIPTokenizerFast: NFC, whitespace runs to one space and
    lower case; CLIP's split; byte-level BPE with `</w>` word ends; <|startoftext|> ... <|endoftext|> around."""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False, unk_token=HF_EOT))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((HF_EOT, EOT_ID), (HF_SOT, SOT_ID), trim_offsets=False,
                                                      add_prefix_space=False)
    tok.add_special_tokens([HF_SOT, HF_EOT])
    return tok


def write_processor_files(config: CLIPConfig, out_dir: Path) -> None:
    """Write the image processor and tokenizer files (PROCESSOR_FILES) into an HF CLIP directory."""
    save_json(image_processor_config(config), out_dir / "preprocessor_config.json")
    vocab, merges = bpe_vocab_and_merges(HF_SOT, HF_EOT)
    atomic_write(out_dir / "vocab.json", lambda tmp: Path(tmp).write_text(json.dumps(vocab, ensure_ascii=False),
                                                                          encoding="utf-8"))
    lines = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    atomic_write(out_dir / "merges.txt", lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
    atomic_write(out_dir / "tokenizer.json", lambda tmp: fast_tokenizer(vocab, merges).save(str(tmp)))
    special = {"bos_token": HF_SOT, "eos_token": HF_EOT, "unk_token": HF_EOT, "pad_token": HF_EOT}
    save_json({"tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor", "do_lower_case": True,
               "errors": "replace", "add_prefix_space": False,
               "model_max_length": config.text.context_length, **special}, out_dir / "tokenizer_config.json")
    save_json(special, out_dir / "special_tokens_map.json")
