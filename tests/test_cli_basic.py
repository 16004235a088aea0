"""`clip-pacl info` and `clip-pacl convert`, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import clip_pacl
from clip_pacl.formats.convert_open_clip import to_open_clip
from clip_pacl_app.cli.main import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_info_on_a_checkpoint_dir(tmp_path, capsys):
    model = clip_pacl.load("tiny")
    clip_pacl.save(model, tmp_path / "ckpt")
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "ckpt"), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["source"] == {"format": "clip_pacl", "location": str(tmp_path / "ckpt"), "hub_id": None}
    arch = info["architecture"]
    assert arch["image_tower"] == {"type": "ViT", "image_size": 64, "width": 128, "layers": 4, "heads": 4,
                                   "patch_size": 8, "grid": 8, "mlp_ratio": 4.0}
    assert arch["text_tower"]["context_length"] == 77 and arch["embed_dim"] == 128 and arch["activation"] == "gelu"
    params = info["parameters"]
    assert params["image_tower"] == sum(p.numel() for p in model.visual.parameters())
    assert params["text_tower"] == sum(p.numel() for p in model.text.parameters())
    assert params["total"] == sum(p.numel() for p in model.parameters()) and params["other"] == 1
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "ckpt"))
    assert code == 0 and "ViT width 128, layers 4, heads 4, patch 8, image size 64" in out
    assert f"parameters: {params['total']:,}" in out


def test_info_on_a_pacl_checkpoint(tmp_path, capsys):
    from clip_pacl.models.pacl import PACL

    pacl = PACL(clip_pacl.load("tiny-rn"))
    clip_pacl.save(pacl, tmp_path / "pacl")
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "pacl"), "--json")
    info = json.loads(out)
    assert code == 0 and info["model"] == "PACL" and info["source"]["format"] == "pacl"
    assert info["architecture"]["image_tower"]["type"] == "ResNet"
    heads = sum(p.numel() for n, p in pacl.named_parameters() if not n.startswith("clip."))
    assert info["parameters"]["other"] == heads + 1  # embedders, PACL's and CLIP's logit scales
    assert info["parameters"]["image_tower"] == sum(p.numel() for p in pacl.clip.visual.parameters())


def test_info_no_quick_gelu_on_a_bare_state_dict(tmp_path, capsys):
    save_file({k: v.contiguous() for k, v in to_open_clip(clip_pacl.load("tiny-rn").state_dict()).items()},
              str(tmp_path / "rn.safetensors"))
    _, out, _ = run_cli(capsys, "info", str(tmp_path / "rn.safetensors"), "--json")
    info = json.loads(out)
    assert info["source"]["format"] == "open_clip" and info["architecture"]["activation"] == "quick_gelu"
    assert info["architecture"]["image_tower"]["type"] == "ResNet"
    assert info["architecture"]["image_tower"]["layers"] == [1, 1, 1, 1]
    _, out, _ = run_cli(capsys, "info", str(tmp_path / "rn.safetensors"), "--no-quick-gelu", "--json")
    assert json.loads(out)["architecture"]["activation"] == "gelu"


def test_convert_to_every_format_and_back(tmp_path, capsys):
    clip_pacl.save(clip_pacl.load("tiny"), tmp_path / "ours")
    original = clip_pacl.load(tmp_path / "ours")
    code, out, _ = run_cli(capsys, "convert", str(tmp_path / "ours"), "--to", "hf", "--out", str(tmp_path / "hf"),
                           "--json")
    assert code == 0 and json.loads(out) == {"src": str(tmp_path / "ours"), "src_format": "clip_pacl", "to": "hf",
                                             "out": str(tmp_path / "hf")}
    code, out, _ = run_cli(capsys, "convert", str(tmp_path / "hf"), "--to", "open_clip", "--out",
                           str(tmp_path / "oc" / "model.pt"))
    assert code == 0 and "wrote open_clip checkpoint" in out
    assert (tmp_path / "oc" / "open_clip_config.json").is_file()
    code, _, _ = run_cli(capsys, "convert", str(tmp_path / "oc" / "model.pt"), "--to", "clip_pacl", "--out",
                         str(tmp_path / "back"))
    assert code == 0
    back = clip_pacl.load(tmp_path / "back")
    assert back.config.vision == original.config.vision and back.config.quick_gelu == original.config.quick_gelu
    assert same_state(original, back)


def test_convert_no_quick_gelu_is_recorded(tmp_path, capsys):
    torch.save(to_open_clip(clip_pacl.load("tiny").state_dict()), tmp_path / "gelu.pt")
    assert run_cli(capsys, "convert", str(tmp_path / "gelu.pt"), "--to", "clip_pacl", "--out", str(tmp_path / "a"),
                   "--no-quick-gelu")[0] == 0
    assert not clip_pacl.load(tmp_path / "a").config.quick_gelu
    assert run_cli(capsys, "convert", str(tmp_path / "gelu.pt"), "--to", "clip_pacl", "--out",
                   str(tmp_path / "b"))[0] == 0
    assert clip_pacl.load(tmp_path / "b").config.quick_gelu


def _bad_source(case, tmp_path):
    if case == "missing file":
        return str(tmp_path / "missing.pt")
    if case == "unknown preset":
        return "ViT-X-99"
    if case == "random text file":
        (tmp_path / "readme.txt").write_text("hello\n")
        return str(tmp_path / "readme.txt")
    if case == "not a checkpoint":
        torch.save({"step": torch.tensor(3)}, tmp_path / "state.pt")
        return str(tmp_path / "state.pt")
    if case == "truncated safetensors":
        model = clip_pacl.load("tiny")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "x.safetensors"))
        data = (tmp_path / "x.safetensors").read_bytes()
        (tmp_path / "x.safetensors").write_bytes(data[: len(data) // 2])
        return str(tmp_path / "x.safetensors")
    if case == "empty directory":
        return str(tmp_path)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing file", "unknown preset", "random text file", "not a checkpoint",
                                  "truncated safetensors", "empty directory"])
def test_bad_input_is_one_error_line(case, tmp_path, capsys):
    src = _bad_source(case, tmp_path)
    for argv in (["info", src], ["convert", src, "--to", "hf", "--out", str(tmp_path / "out")],
                 ["export", "onnx", "--model", src, "--out", str(tmp_path / "onnx")]):
        code, out, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "onnx").exists()


def test_formats_that_cannot_hold_the_model(tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", "tiny-rn", "--random-weights", "--to", "hf",
                           "--out", str(tmp_path / "hf"))
    assert code == 2 and err.splitlines()[-1].startswith("error: Hugging Face CLIPModel has no ResNet image tower")


def test_error_in_a_real_process(tmp_path):
    (tmp_path / "notes.pt").write_text("not weights")
    proc = subprocess.run([sys.executable, "-m", "clip_pacl_app.cli.main", "info", str(tmp_path / "notes.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (f"error: {tmp_path / 'notes.pt'} is not a checkpoint clip-pacl can read: "
                                   "not a safetensors, PyTorch or TorchScript file")


def test_a_bad_device_is_one_line(tmp_path, capsys):
    from PIL import Image

    from clip_pacl_app.cli.main import main

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["zeroshot", "--model", "tiny", "--random-weights",
                 "--device", "blah", str(tmp_path / "x.png"), "--classes", "a,b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --device 'blah' is not a device (cpu, cuda or cuda:N)"


@pytest.mark.parametrize("command", [["eval", "segmentation"], ["train"], ["segment"], ["serve"]])
def test_help_states_real_defaults_only_once(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare as one line
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "else cpu) (default:" not in text  # help that names its own default gets no second one
    if command == ["eval", "segmentation"]:
        assert "images per forward pass (default: 16)" in text
