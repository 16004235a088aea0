"""The README's Python block works on any model (the demo's has a 32-token context), and a hub name fails fast
and clearly when the Hub cannot be reached."""

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

import clip_pacl

README = Path(__file__).resolve().parent.parent / "README.md"
HUB_LOAD = 'clip_pacl.load("ViT-B-32", pretrained="openai")'


def python_api_block() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_block_runs_on_a_short_context_model(tmp_path, monkeypatch, capsys):
    config = clip_pacl.CLIPConfig.from_name("tiny")
    config = replace(config, text=replace(config.text, context_length=32))  # as the demo's CLIP
    clip_pacl.save(clip_pacl.CLIP(config), tmp_path / "demo_clip")
    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "cat.jpg")
    block = python_api_block()
    assert HUB_LOAD in block  # the hub name is the one substitution: this test runs offline
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace(HUB_LOAD, 'clip_pacl.load("demo_clip")'), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("tensor([[") and printed.count(",") == 1  # one image, two probabilities


def test_get_tokenizer_fits_the_model():
    config = clip_pacl.CLIPConfig.from_name("tiny")
    model = clip_pacl.CLIP(replace(config, text=replace(config.text, context_length=32)))
    assert clip_pacl.get_tokenizer(model)(["a cat"]).shape == (1, 32)
    assert clip_pacl.get_tokenizer("ViT-B-32")(["a cat"]).shape == (1, 77)
    assert clip_pacl.get_tokenizer(16)(["a cat"]).shape == (1, 16)
    assert torch.equal(clip_pacl.tokenize(["a cat"]), clip_pacl.get_tokenizer(77)(["a cat"]))  # 77 stays the default
    with pytest.raises(ValueError, match=r"clip_pacl.get_tokenizer\(model\)"):
        model.encode_text(clip_pacl.tokenize(["a cat"]))


def test_an_unreachable_hub_fails_in_seconds_with_one_sentence(tmp_path):
    """A refused connection (nothing listens on port 9), HF_HUB_OFFLINE unset: huggingface_hub alone retries for
    about a minute; `load` must answer in seconds, in words that fit a Python caller (no CLI flag)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "cache"))
    code = ("import time, clip_pacl\n"
            "start = time.perf_counter()\n"
            "try:\n"
            "    clip_pacl.load('ViT-B-32', pretrained='openai')\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, time.perf_counter() - start)\n"
            "    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    name, seconds = done.stdout.splitlines()[0].split()
    message = done.stdout.splitlines()[1:]
    assert float(seconds) < 20, seconds  # it took 54-56 s of retries before
    assert len(message) == 1 and "--" not in message[0]
    assert message[0].startswith("could not download 'timm/vit_base_patch32_clip_224.openai' (the Hub at "
                                 "http://127.0.0.1:9 is unreachable") and "pass the local directory" in message[0]
    assert name == "HubUnreachableError"
