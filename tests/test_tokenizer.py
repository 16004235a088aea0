"""The tokenizer gives open_clip's ids on a varied, deterministic corpus, with and without ftfy."""

import random
import sys

import pytest
import torch

from clip_pacl.tokenizer import (
    EOT_ID,
    SOT_ID,
    VOCAB_SIZE,
    Tokenizer,
    clean_text,
    fix_text_builtin,
    get_tokenizer,
    tokenize,
)
from helpers import require

open_clip = require("open_clip")

WORDS = [
    "a", "photo", "of", "the", "Cat", "DOG", "sitting", "on", "Bench", "near", "river", "New", "York", "skyline",
    "McDonald's", "iPhone", "e-mail", "state-of-the-art", "self_driving", "C++", "node.js", "U.S.A.", "co-op",
]
CONTRACTIONS = ["it's", "don't", "we're", "they've", "I'm", "you'll", "he'd", "IT'S", "Can't", "o'clock", "rock'n'roll"]
NUMBERS = ["0", "7", "42", "2024", "3.14159", "1,000,000", "-12", "+49 30 1234", "1e-5", "50%", "$9.99", "#1", "4K"]
ACCENTED = ["café", "naïve", "Ångström", "crème brûlée", "São Paulo", "Zürich", "Łódź", "façade", "ÉCOLE", "Straße",
            "cafe\u0301", "n\u0303o"]  # last two: decomposed (NFD) accents
SCRIPTS = ["日本語のテキスト", "猫が座っている", "中文字符", "한국어 문장", "Привет мир", "Ελληνικά", "שלום עולם",
           "مرحبا بالعالم", "नमस्ते दुनिया", "สวัสดีครับ", "Tiếng Việt"]
EMOJI = ["😀", "👍🏽", "🇫🇷", "👨‍👩‍👧‍👦", "❤️", "🐱", "✨🎉", "☕", "🤖💬"]
PUNCT = ["!", "?", "...", "…", "—", "–", "(", ")", "[x]", "{y}", "<b>", "@user", "#tag", "/", "\\", "*", "~", "|", ";",
         ":", "\"", "'", "«quote»", "¿qué?", "¡hola!", "•", "©", "®", "™", "°C", "½", "→", "∑", "£", "€", "¥"]
HTML = ["&amp;", "&#39;", "&quot;", "&lt;", "&gt;", "&nbsp;", "&eacute;", "&EACUTE;", "&#x27;", "&#8217;", "&amp;amp;",
        "&amp;amp;amp;", "&ldquo;hi&rdquo;", "&copy;", "&hellip;", "&notanentity;", "AT&T", "&", "&#128512;"]
TYPOGRAPHY = ["“curly”", "‘single’", "it’s", "ﬁne", "ﬂow", "ﬀ", "ĳ", "ＦＵＬＬ　ｗｉｄｔｈ", "ｶﾀｶﾅ", "１２３",
              "ʼn", "‛rev‟"]
WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u200b", "\x85", "\u2003"]
CONTROL = ["\x00", "\x07", "\x1b[31mred\x1b[0m", "\ufeff", "\x7f", "\x96", "\x93quoted\x94", "\u206a", "\ufffc"]
POOLS = [WORDS] * 6 + [CONTRACTIONS, NUMBERS, ACCENTED, SCRIPTS, EMOJI, PUNCT, HTML, TYPOGRAPHY, CONTROL]
EDGE_CASES = [
    "", " ", "   \t\n  ", "\n", "a", "A", "!", "'s", "''", "<start_of_text>", "x <end_of_text> y", "hello<end_of_text>",
    "(<end_of_text>", "a.<end_of_text>!", "<END_OF_TEXT>", "x<start_of_text>y",
    "a < b &amp; c", "1 < 2\n&amp; more", "ALL CAPS SENTENCE", "MiXeD cAsE wOrDs", "trailing space ", " leading",
    "a photo of a " + "very " * 100 + "long caption",  # > 77 tokens: truncation keeps the end token
    " ".join(f"word{i}" for i in range(200)),
    "supercalifragilisticexpialidocious" * 5,  # one long word
    "😀" * 80,
]
# Mojibake: only ftfy repairs these; the built-in fallback is documented not to.
MOJIBAKE = ["cafÃ©", "âœ” done", "Ã¡rvÃ­ztÅ±rÅ‘", "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows."]


def make_corpus(n: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = list(EDGE_CASES)
    while len(texts) < n:
        pieces = []
        for _ in range(rng.randint(1, 25)):
            piece = rng.choice(rng.choice(POOLS))
            if rng.random() < 0.1:
                piece = piece.upper() if rng.random() < 0.5 else piece.title()
            pieces.append(piece)
            pieces.append(rng.choice(WHITESPACE) if rng.random() < 0.15 else ("" if rng.random() < 0.2 else " "))
        texts.append("".join(pieces))
    return texts


CORPUS = make_corpus()


def is_mojibake(text: str) -> bool:
    """ftfy re-decodes this text (beyond mapping lone C1 controls through Windows-1252, which the fallback does)."""
    ftfy = require("ftfy")
    steps = [step for line in text.split("\n") for step in ftfy.fix_and_explain(line).explanation or []]
    return any(step.action in ("encode", "decode") or step.parameter == "decode_inconsistent_utf8" for step in steps)


def test_corpus_is_varied():
    assert len(CORPUS) >= 1000 and len(set(CORPUS)) > 1000
    lengths = (open_clip.tokenize(CORPUS) != 0).sum(1)
    assert (lengths == 77).sum() >= 10  # truncated rows
    assert (lengths == 2).sum() >= 3  # empty / whitespace-only / control-only rows


def test_same_ids_as_open_clip():
    ours = tokenize(CORPUS)
    theirs = open_clip.tokenize(CORPUS)
    assert ours.dtype == torch.long and ours.shape == (len(CORPUS), 77)
    mismatches = [CORPUS[i] for i in range(len(CORPUS)) if not torch.equal(ours[i], theirs[i])]
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[:3]!r}"


def test_same_ids_as_open_clip_without_ftfy():
    """The fallback matches everywhere except where ftfy repairs mojibake: random joins such as 'é' + '\\x85' + '¥'
    happen to be valid UTF-8 read as Latin-1 ('酥'), which only ftfy's encoding detector undoes."""
    texts = [t for t in CORPUS if not is_mojibake(t)]
    assert len(texts) > 0.97 * len(CORPUS)
    ours = Tokenizer(use_ftfy=False)(texts)
    theirs = open_clip.tokenize(texts)
    mismatches = [texts[i] for i in range(len(texts)) if not torch.equal(ours[i], theirs[i])]
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[:3]!r}"


def test_mojibake_repaired_with_ftfy():
    require("ftfy")
    assert torch.equal(tokenize(MOJIBAKE), open_clip.tokenize(MOJIBAKE))
    assert clean_text("cafÃ©") == "café"
    assert fix_text_builtin("cafÃ©") == "cafÃ©"  # the documented limit of the fallback


def test_builtin_fix_text_matches_ftfy_on_corpus():
    ftfy = require("ftfy")
    differ = [t for t in CORPUS if not is_mojibake(t) and fix_text_builtin(t) != ftfy.fix_text(t)]
    assert not differ, differ[:3]


@pytest.mark.parametrize("context_length", [2, 5, 16, 32, 77, 100])
def test_context_length_and_truncation(context_length):
    texts = CORPUS[:300]
    ours = tokenize(texts, context_length=context_length)
    assert torch.equal(ours, open_clip.tokenize(texts, context_length=context_length))
    assert ours.shape == (300, context_length)
    assert (ours[:, 0] == SOT_ID).all()
    assert ((ours == EOT_ID).sum(1) >= 1).all()  # every row keeps its end token, even when truncated
    assert torch.equal(get_tokenizer(context_length)(texts), ours)


def test_truncated_row_ends_with_eot():
    row = tokenize("word " * 200)[0]
    assert row[-1] == EOT_ID and (row != 0).all()


def test_rejects_context_shorter_than_two():
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a cat", context_length=1)


def test_single_string_and_empty_list():
    assert tokenize("a cat").shape == (1, 77)
    assert tokenize([]).shape == (0, 77)
    assert torch.equal(tokenize(""), torch.tensor([[SOT_ID, EOT_ID] + [0] * 75]))


def test_encode_and_decode_round_trip():
    tok = get_tokenizer()
    assert tok is get_tokenizer()  # cached
    for text in ["a photo of a cat", "Two dogs playing in the snow.", "Café & crème brûlée, 3 euros!", "日本語 😀"]:
        ids = tok.encode(text)
        assert all(0 <= i < VOCAB_SIZE for i in ids)
        assert torch.equal(tok(text)[0, 1 : len(ids) + 1], torch.tensor(ids))
        assert tok.decode(tok(text)[0]).replace(" ", "") == clean_text(text).replace(" ", "")
    assert tok.decode(tok("a photo of a cat")[0]) == "a photo of a cat"
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_falls_back_to_builtin_fixes_when_ftfy_is_missing(monkeypatch):
    import clip_pacl.tokenizer as tokenizer_module

    monkeypatch.setitem(sys.modules, "ftfy", None)  # makes `import ftfy` raise ImportError
    tokenizer_module._default_fix_text.cache_clear()
    try:
        assert tokenizer_module._default_fix_text() is fix_text_builtin
        assert torch.equal(Tokenizer()(["&ldquo;ﬁne&rdquo; caf\u00e9"]), open_clip.tokenize(['"fine" café']))
    finally:
        tokenizer_module._default_fix_text.cache_clear()
