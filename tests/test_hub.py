"""Hub names resolve through huggingface_hub's cache; offline without a cached copy is one clear error.

The tests build a Hugging Face cache themselves (the hub cache layout: `models--org--name/refs/main`
naming a snapshot under `snapshots/<rev>/`) and run offline, so nothing is downloaded.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import clip_pacl
from clip_pacl.checkpoint import export_open_clip, load_with_source
from clip_pacl.checkpoint.hub import pretrained_repo
from clip_pacl.errors import CheckpointError
from helpers import require

hf_constants = require("huggingface_hub.constants")
transformers = require("transformers")

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache, repo_id: str, files: dict) -> None:
    """Put `files` ({name: bytes}) into `cache` as huggingface_hub lays out a downloaded snapshot."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def directory_files(path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that huggingface_hub uses, offline (other test modules import this fixture)."""
    hf_constants = require("huggingface_hub.constants")
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def hf_repo_files(tmp_path_factory):
    """A tiny random transformers CLIPModel as `save_pretrained` writes it."""
    transformers = require("transformers")
    out = tmp_path_factory.mktemp("hf_model")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16),
        projection_dim=32)
    transformers.CLIPModel(config).save_pretrained(out)
    return out


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hf_repo_id_loads_from_the_cache(offline_cache, hf_repo_files):
    cache_repo(offline_cache, "acme/tiny-clip", directory_files(hf_repo_files))
    model, source = load_with_source("acme/tiny-clip")
    assert source.format == "hf" and source.hub_id == "acme/tiny-clip" and source.revision == REVISION
    assert source.location.startswith(str(offline_cache))
    assert same_state(model, clip_pacl.load(hf_repo_files))


def test_open_clip_repo_with_hf_hub_prefix(offline_cache, tmp_path):
    ours = clip_pacl.load("tiny-rn")
    export_open_clip(ours, tmp_path / "repo")  # open_clip_model.safetensors + open_clip_config.json
    cache_repo(offline_cache, "acme/tiny-rn-open-clip", directory_files(tmp_path / "repo"))
    model, source = load_with_source("hf-hub:acme/tiny-rn-open-clip")
    assert source.format == "open_clip" and source.hub_id == "acme/tiny-rn-open-clip" and source.revision == REVISION
    assert same_state(model, ours) and model.config.vision == ours.config.vision


def test_pretrained_tag_downloads_the_tags_repo(offline_cache, tmp_path, monkeypatch):
    from clip_pacl.checkpoint import hub

    ours = clip_pacl.load("tiny-quickgelu")
    export_open_clip(ours, tmp_path / "repo")
    cache_repo(offline_cache, "acme/tiny_clip.openai", directory_files(tmp_path / "repo"))
    monkeypatch.setitem(hub.OPENAI_REPOS, "tiny", "acme/tiny_clip.openai")  # as ViT-B-32 -> timm/vit_base_...
    model, source = load_with_source("tiny", pretrained="openai")
    assert source.hub_id == "acme/tiny_clip.openai" and source.revision == REVISION and model.config.quick_gelu
    assert same_state(model, ours)


def test_uncached_names_fail_with_the_local_alternative(offline_cache):
    with pytest.raises(CheckpointError) as info:
        clip_pacl.load("openai/clip-vit-base-patch32")
    message = str(info.value)
    assert "could not download 'openai/clip-vit-base-patch32' (offline" in message
    assert str(offline_cache) in message and "pass the local directory" in message and "\n" not in message
    with pytest.raises(CheckpointError, match="timm/vit_base_patch32_clip_224.openai"):
        clip_pacl.load("ViT-B-32", pretrained="openai")


def test_pretrained_tags_name_open_clip_repos():
    assert pretrained_repo("ViT-B-32", "openai") == "timm/vit_base_patch32_clip_224.openai"
    assert pretrained_repo("RN50-quickgelu", "openai") == "timm/resnet50_clip.openai"
    require("open_clip")
    assert pretrained_repo("ViT-B-32", "laion2b_s34b_b79k") == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    with pytest.raises(CheckpointError, match="no hub weights 'nope'"):
        pretrained_repo("ViT-B-32", "nope")


def test_pretrained_may_be_a_local_file_for_a_preset(tmp_path):
    ours = clip_pacl.load("tiny")
    export_open_clip(ours, tmp_path / "w.pt")
    (tmp_path / "open_clip_config.json").unlink()  # the preset names the architecture
    assert same_state(clip_pacl.load("tiny", pretrained=str(tmp_path / "w.pt"), quick_gelu=False), ours)


def test_cli_in_a_real_process_uses_the_environment(tmp_path, hf_repo_files):
    """HF_HUB_CACHE / HF_HUB_OFFLINE set in the environment of a separate process, as a user sets them."""
    cache = tmp_path / "cache"
    cache_repo(cache, "acme/tiny-clip", directory_files(hf_repo_files))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "clip_pacl_app.cli.main"]
    ok = subprocess.run([*cmd, "info", "acme/tiny-clip", "--json"], env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    assert info["source"]["format"] == "hf" and info["source"]["hub_id"] == "acme/tiny-clip"
    assert info["architecture"]["image_tower"]["patch_size"] == 16
    missing = subprocess.run([*cmd, "info", "acme/not-cached"], env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stdout == ""
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 'acme/not-cached' is not a local file or directory, and "
                                                   "could not download 'acme/not-cached' (offline")


def test_an_index_built_from_a_hub_model_records_its_revision(offline_cache, hf_repo_files, tmp_path):
    """The index's fingerprint names the hub commit its weights came from (and a local model records none)."""
    from PIL import Image

    from clip_pacl_app.cli.main import main as cli_main

    cache_repo(offline_cache, "acme/tiny-clip", directory_files(hf_repo_files))
    (tmp_path / "photos").mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (40, 40), colour).save(tmp_path / "photos" / f"{i}.png")
    for model, idx, revision in (("acme/tiny-clip", "hub_idx", REVISION), (str(hf_repo_files), "local_idx", None)):
        assert cli_main(["index", "build", "--model", model, "--images", str(tmp_path / "photos"),
                         "--out", str(tmp_path / idx)]) == 0
        assert json.loads((tmp_path / idx / "meta.json").read_text())["hub_revision"] == revision
