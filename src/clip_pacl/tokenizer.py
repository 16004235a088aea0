"""CLIP's byte-level BPE tokenizer, on the Rust `tokenizers` library.

Produces exactly the ids of OpenAI CLIP / open_clip's ``tokenize``: text is cleaned the same way (ftfy, double HTML
unescape, whitespace collapse, lower case), split with CLIP's regex, byte-encoded and BPE-merged with the 49,152-merge
vocabulary shipped in ``assets/``. Rows are ``<start_of_text> ids... <end_of_text>`` padded with 0; text longer than
the context is cut and the last kept position becomes ``<end_of_text>`` (the text tower pools there). Like open_clip, a
literal ``<end_of_text>`` / ``<start_of_text>`` typed in a caption is read as that special token.

``ftfy`` is optional: when it is missing, a built-in copy of the ftfy fixes that matter for ordinary text is used
(HTML entities incl. upper-case ones, curly quotes, Latin ligatures, full/half-width forms, C1 and other control
characters, terminal escapes, line breaks, surrogates, NFC). The one thing it cannot do is repair mojibake
(``cafÃ©`` -> ``café``), so such text tokenizes differently from open_clip without ftfy.
"""

from __future__ import annotations

import gzip
import html
import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources

import numpy as np
import torch
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as _RustTokenizer

DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"  # open_clip's spelling of OpenAI's <|startoftext|>
EOT_TOKEN = "<end_of_text>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # the vocab file has more merges than CLIP uses; the rest are ignored
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's split: contractions, letter runs, single digits, runs of anything else; whitespace is dropped.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# ---------------------------------------------------------------------------------------------------------------------
# Text cleaning (open_clip's basic_clean + whitespace_clean + lower)
# ---------------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the same one the Rust ByteLevel pre-tokenizer uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _html_entities() -> dict[str, str]:
    """ftfy's entity table: every ';'-terminated HTML5 entity, plus upper-cased names of lower-case ones."""
    entities = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            if name == name.lower():
                upper = "&" + name.upper()
                if html.unescape(upper) == upper:
                    entities[upper] = char.upper()
    return entities


def _width_map() -> dict[int, str]:
    width_map = {0x3000: " "}
    for i in range(0xFF01, 0xFFF0):
        alternate = unicodedata.normalize("NFKC", chr(i))
        if alternate != chr(i):
            width_map[i] = alternate
    return width_map


_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_HTML_ENTITIES = _html_entities()
_C1_RE = re.compile(r"[\x80-\x9f]")
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_SINGLE_QUOTE_RE = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTE_RE = re.compile("[\u201c-\u201f]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_LIGATURES = str.maketrans(
    {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž", "Ǉ": "LJ",
     "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl",
     "ﬅ": "ſt", "ﬆ": "st"}
)
_WIDTH_MAP = _width_map()
_CONTROL_CHARS = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)


def _unescape_entity(match: re.Match[str]) -> str:
    text = match.group(0)
    if text in _HTML_ENTITIES:
        return _HTML_ENTITIES[text]
    if text.startswith("&#"):
        unescaped = html.unescape(text)
        return text if ";" in unescaped else unescaped
    return text


def _decode_c1(match: re.Match[str]) -> str:
    """A lone C1 control character is almost always a Windows-1252 byte decoded as Latin-1 (ftfy's view)."""
    try:
        return match.group(0).encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:  # the five bytes cp1252 leaves undefined stay as they are ("sloppy" cp1252)
        return match.group(0)


def _join_surrogates(match: re.Match[str]) -> str:
    high, low = match.group(0)
    return chr(0x10000 + (ord(high) - 0xD800) * 0x400 + (ord(low) - 0xDC00))


def _fix_segment(text: str, unescape: bool) -> str:
    while True:
        original = text
        if unescape:
            text = _HTML_ENTITY_RE.sub(_unescape_entity, text)
        text = _C1_RE.sub(_decode_c1, text)
        text = text.translate(_LIGATURES).translate(_WIDTH_MAP)
        text = _SINGLE_QUOTE_RE.sub("'", _DOUBLE_QUOTE_RE.sub('"', text))
        for line_break in ("\r\n", "\r", "\u2028", "\u2029", "\u0085"):
            text = text.replace(line_break, "\n")
        if _SURROGATE_RE.search(text):
            text = _SURROGATE_RE.sub("\ufffd", _SURROGATE_PAIR_RE.sub(_join_surrogates, text))
        text = _ANSI_RE.sub("", text).translate(_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == original:
            return text


def fix_text_builtin(text: str) -> str:
    """ftfy.fix_text without mojibake repair: same line-by-line processing and HTML rule (no unescaping once a
    line contains '<')."""
    lines = text.split("\n")
    unescape = True
    fixed = []
    for i, line in enumerate(lines):
        if i < len(lines) - 1:
            line += "\n"
        if "<" in line:
            unescape = False
        fixed.append(_fix_segment(line, unescape))
    return "".join(fixed)


def clean_text(text: str, fix_text: Callable[[str], str] | None = None) -> str:
    """open_clip's cleaning: ``fix_text`` (ftfy when installed), HTML-unescape twice, collapse whitespace, lower.

    Printable ASCII without '&' is returned lower-cased and whitespace-collapsed without running ftfy (it cannot
    change such text), which keeps the common case fast.
    """
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = (fix_text or _default_fix_text())(text)
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


@lru_cache(maxsize=1)
def _default_fix_text() -> Callable[[str], str]:
    try:
        import ftfy
    except ImportError:
        return fix_text_builtin
    return ftfy.fix_text


# ---------------------------------------------------------------------------------------------------------------------
# BPE
# ---------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def bpe_vocab_and_merges(sot_token: str = SOT_TOKEN, eot_token: str = EOT_TOKEN
                          ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary (token -> id, 49,408 entries) and merge list, from the shipped file; the special tokens
    spelled `sot_token` / `eot_token` (Hugging Face spells them <|startoftext|> / <|endoftext|>)."""
    with (resources.files("clip_pacl") / "assets" / VOCAB_FILE).open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [sot_token, eot_token]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE and vocab[eot_token] == EOT_ID
    return vocab, merges


def _load_bpe() -> _RustTokenizer:
    """Build the Rust BPE tokenizer from the shipped merge list (once per process, ~0.3 s)."""
    vocab, merges = bpe_vocab_and_merges()
    tok = _RustTokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tok


# open_clip's regex puts its special-token strings first, so a literal "<end_of_text>" in a caption becomes id 49407
# where that regex would start a match there (not after other punctuation, e.g. "(<end_of_text>").
_SPECIAL_IDS = {SOT_TOKEN: SOT_ID, EOT_TOKEN: EOT_ID}
_SPLIT_WITH_SPECIALS = pre_tokenizers.Split(
    Regex(f"{SOT_TOKEN}|{EOT_TOKEN}|{SPLIT_PATTERN}"), behavior="removed", invert=True
)


def _encode_cleaned(bpe: _RustTokenizer, texts: list[str]) -> list[list[int]]:
    """BPE ids of cleaned texts; the rare text containing a special-token string takes a per-piece path."""
    ids = [encoding.ids for encoding in bpe.encode_batch(texts, add_special_tokens=False)]
    for i, text in enumerate(texts):
        if SOT_TOKEN in text or EOT_TOKEN in text:
            ids[i] = []
            for piece, _ in _SPLIT_WITH_SPECIALS.pre_tokenize_str(text):
                ids[i] += [_SPECIAL_IDS[piece]] if piece in _SPECIAL_IDS else bpe.encode(piece).ids
    return ids


class Tokenizer:
    """Callable like open_clip's tokenizer: ``tokenizer(texts) -> LongTensor (B, context_length)``.

    ``use_ftfy``: None uses ftfy when it is installed; False forces the built-in subset (see the module docstring).
    """

    vocab_size = VOCAB_SIZE
    sot_token_id = SOT_ID
    eot_token_id = EOT_ID

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, use_ftfy: bool | None = None) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        self.context_length = context_length
        self._fix_text = fix_text_builtin if use_ftfy is False else _default_fix_text()
        if use_ftfy and self._fix_text is fix_text_builtin:
            raise ImportError("use_ftfy=True but ftfy is not installed (pip install ftfy)")
        self._bpe = _load_bpe()

    def encode(self, text: str) -> list[int]:
        """BPE ids of one cleaned text, without start/end tokens and without truncation."""
        return _encode_cleaned(self._bpe, [clean_text(text, self._fix_text)])[0]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {length}")
        cleaned = [clean_text(t, self._fix_text) for t in texts]
        rows = np.zeros((len(cleaned), length), dtype=np.int64)  # (B, L), 0 = padding
        rows[:, 0] = SOT_ID
        for i, text_ids in enumerate(_encode_cleaned(self._bpe, cleaned)):
            ids = text_ids[: length - 2]
            rows[i, 1 : len(ids) + 1] = ids
            rows[i, len(ids) + 1] = EOT_ID
        return torch.from_numpy(rows)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one row of ids: skips the start token, stops at the end token (so padding is ignored)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        id_to_token = _id_to_token()
        pieces = []
        for i in ids:
            if i == EOT_ID:
                break
            if i != SOT_ID:
                pieces.append(id_to_token[i])
        byte_decoder = _byte_decoder()
        data = bytes(byte_decoder[c] for c in "".join(pieces).replace("</w>", " "))
        return data.decode("utf-8", errors="replace").strip()


@lru_cache(maxsize=1)
def _id_to_token() -> list[str]:
    bpe = _load_bpe()
    return [bpe.id_to_token(i) for i in range(VOCAB_SIZE)]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    decoder = {c: b for b, c in _bytes_to_unicode().items()}
    decoder[" "] = ord(" ")
    return decoder


@lru_cache(maxsize=8)
def _shared_tokenizer(context_length: int) -> Tokenizer:
    return Tokenizer(context_length)


def get_tokenizer(model: object | str | int = DEFAULT_CONTEXT_LENGTH) -> Callable[..., torch.Tensor]:
    """The tokenizer that fits a model, open_clip's habit: `get_tokenizer(model)` is the model's own (its context
    length; a backbone model's text tokenizer), `get_tokenizer("ViT-B-32")` a preset's, `get_tokenizer(77)` CLIP's
    BPE for a context length (loading the vocabulary is done once per process)."""
    if hasattr(model, "get_tokenizer"):
        return model.get_tokenizer()
    if isinstance(model, str):
        from clip_pacl.config import CLIPConfig

        return _shared_tokenizer(CLIPConfig.from_name(model).text.context_length)
    if isinstance(model, int) and not isinstance(model, bool):
        return _shared_tokenizer(model)
    raise TypeError(f"get_tokenizer takes a model, a preset name or a context length, not {type(model).__name__}")


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.LongTensor:
    """CLIP token ids, (B, context_length) int64: same ids as ``open_clip.tokenize`` (77 tokens, the OpenAI
    models' context). For any other model use its own tokenizer: `get_tokenizer(model)(texts)`."""
    return _shared_tokenizer(context_length)(texts)
