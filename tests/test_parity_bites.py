"""The parity comparisons can fail: a converter with two tensors swapped makes them fail.

Each case swaps a pair in memory, where the converters keep it: entries of the HF rename tables, or the output of
the open_clip/OpenAI key converter (a prefix move, with no table to patch). The same comparison that the parity
tests assert below 1e-5 must then be above 1e-3, and below 1e-5 without the swap. On fresh weights (zero biases,
identity norms) several of these swaps would go unseen; `randomize_` is what makes them visible.
"""

import pytest
import torch

import clip_pacl
from clip_pacl.formats import convert_hf, convert_open_clip, export_hf, export_open_clip
from helpers import hf_diff, open_clip_diff, preset_dict, randomize_, require

transformers = require("transformers")
open_clip = require("open_clip")

TOL = 1e-5
BITES = 1e-3

HF_TABLE_SWAPS = {
    "layer_norm1/layer_norm2": (convert_hf.BLOCK, [("ln_1.weight", "ln_2.weight"), ("ln_1.bias", "ln_2.bias")]),
    "pre_layrnorm/post_layernorm": (convert_hf.TOP_LEVEL, [("visual.ln_pre.weight", "visual.ln_post.weight"),
                                                           ("visual.ln_pre.bias", "visual.ln_post.bias")]),
}
HF_ONLY_BIASES = {  # a table swap of a single pair of tensors that are zero in a fresh model
    "layer_norm1.bias/layer_norm2.bias": (convert_hf.BLOCK, [("ln_1.bias", "ln_2.bias")]),
    "out_proj.bias/fc2.bias": (convert_hf.BLOCK, [("attn.out_proj.bias", "mlp.c_proj.bias")]),
}


def swap_table(monkeypatch, table: dict, pairs) -> None:
    for a, b in pairs:
        first, second = table[a], table[b]
        monkeypatch.setitem(table, a, second)
        monkeypatch.setitem(table, b, first)


def swap_output(monkeypatch, module, function: str, pairs) -> None:
    """Wrap `module.function` (a state-dict converter) so the tensors of each key pair come out swapped."""
    original = getattr(module, function)

    def swapped(*args, **kwargs):
        state = dict(original(*args, **kwargs))
        for a, b in pairs:
            state[a], state[b] = state[b], state[a]
        return state

    monkeypatch.setattr(module, function, swapped)


def _hf_config():
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu")
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=16, hidden_act="gelu")
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


@pytest.mark.parametrize("swap", [*HF_TABLE_SWAPS, *HF_ONLY_BIASES])
def test_hf_load_fails_with_a_swapped_table_entry(swap, monkeypatch, tmp_path):
    hf_model = randomize_(transformers.CLIPModel(_hf_config())).eval()
    hf_model.save_pretrained(tmp_path)
    assert hf_diff(hf_model, clip_pacl.load(tmp_path), 32) < TOL
    swap_table(monkeypatch, *{**HF_TABLE_SWAPS, **HF_ONLY_BIASES}[swap])
    assert hf_diff(hf_model, clip_pacl.load(tmp_path), 32) > BITES


@pytest.mark.parametrize("swap", list(HF_TABLE_SWAPS))
def test_hf_export_fails_with_a_swapped_table_entry(swap, monkeypatch, tmp_path):
    ours = randomize_(clip_pacl.load("tiny", quick_gelu=False)).eval()
    export_hf(ours, tmp_path / "good")
    assert hf_diff(transformers.CLIPModel.from_pretrained(tmp_path / "good"), ours, 64) < TOL
    swap_table(monkeypatch, *HF_TABLE_SWAPS[swap])
    export_hf(ours, tmp_path / "bad")
    assert hf_diff(transformers.CLIPModel.from_pretrained(tmp_path / "bad"), ours, 64) > BITES


def _norms_of(block: str) -> list[tuple[str, str]]:
    return [(f"{block}.ln_1.{p}", f"{block}.ln_2.{p}") for p in ("weight", "bias")]


OPEN_CLIP_SWAPS = {
    "attnpool k/v bias": ("tiny-rn", [("visual.attnpool.k_proj.bias", "visual.attnpool.v_proj.bias")]),
    "visual ln_1/ln_2": ("tiny", _norms_of("visual.transformer.resblocks.1")),
    "text ln_1/ln_2": ("tiny-rn", _norms_of("text.transformer.resblocks.2")),
    "BatchNorm mean/bias": ("tiny-rn", [("visual.layer2.0.bn2.running_mean", "visual.layer2.0.bn2.bias")]),
}


def _open_clip_reference(preset: str):
    return randomize_(open_clip.model.CLIP(**preset_dict(preset), quick_gelu=True)).eval()


@pytest.mark.parametrize("swap", list(OPEN_CLIP_SWAPS))
def test_open_clip_load_fails_with_swapped_tensors(swap, monkeypatch, tmp_path):
    preset, pairs = OPEN_CLIP_SWAPS[swap]
    reference = _open_clip_reference(preset)
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    assert open_clip_diff(reference, clip_pacl.load(tmp_path / "weights.pt"), 64) < TOL
    swap_output(monkeypatch, convert_open_clip, "from_open_clip", pairs)
    assert open_clip_diff(reference, clip_pacl.load(tmp_path / "weights.pt"), 64) > BITES


@pytest.mark.parametrize("swap", ["attnpool k/v bias", "text ln_1/ln_2"])
def test_open_clip_export_fails_with_swapped_tensors(swap, monkeypatch, tmp_path):
    preset, pairs = OPEN_CLIP_SWAPS[swap]
    ours = randomize_(clip_pacl.load(preset, quick_gelu=True)).eval()
    open_clip_pairs = [(a.removeprefix("text."), b.removeprefix("text.")) for a, b in pairs]

    def exported(out):
        reference = open_clip.model.CLIP(**preset_dict(preset), quick_gelu=True)
        reference.load_state_dict(torch.load(export_open_clip(ours, out), weights_only=True))
        return reference

    assert open_clip_diff(exported(tmp_path / "good.pt"), ours, 64) < TOL
    swap_output(monkeypatch, convert_open_clip, "to_open_clip", open_clip_pairs)
    assert open_clip_diff(exported(tmp_path / "bad.pt"), ours, 64) > BITES
