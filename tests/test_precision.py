"""`--precision` resolution (`clip_pacl.device`) and where benchmarks say they ran."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

import clip_pacl
from clip_pacl import device as dev
from clip_pacl.errors import ConfigError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx2", "fma"})
    assert dev.resolve_precision("auto", "cpu") == "fp32"
    for flag in ("amx_bf16", "avx512_bf16"):
        monkeypatch.setattr(dev, "cpu_flags", lambda flag=flag: {"avx2", flag})
        assert dev.resolve_precision("auto", "cpu") == "bf16"


def test_explicit_precisions_and_errors():
    assert dev.resolve_precision(None) == "fp32"
    assert dev.resolve_precision("fp32", "cpu") == "fp32"
    assert dev.resolve_precision("bf16", "cpu") == "bf16"  # runs anywhere PyTorch has bf16 kernels, even slowly
    assert dev.precision_dtype("bf16") is torch.bfloat16
    with pytest.raises(ConfigError, match="fp32, bf16, auto"):
        dev.resolve_precision("fp16x")


def test_cpu_flags_read_from_linux():
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = dev.cpu_flags()
    assert flags and all(isinstance(f, str) for f in flags)


def test_machine_info_says_where_it_ran():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import machine
    finally:
        sys.path.remove(str(BENCHMARKS))
    info = machine.with_machine({"x": 1, "threads": 7})
    assert info["x"] == 1 and info["threads"] == 7  # the record's own fields win
    for key in ("cpu", "cpu_flags", "cpu_capability", "load_avg_1m", "torch"):
        assert key in info
    assert set(info["cpu_flags"]) <= set(machine.FLAGS_THAT_MATTER)


def test_every_benchmark_record_carries_the_machine():
    """A benchmark that appends JSONL does it through machine.py (`append_jsonl`, `with_machine`, `machine_info`),
    so every row names the CPU, its flags, threads and load."""
    for path in sorted(BENCHMARKS.glob("*.py")):
        source = path.read_text()
        writes = "results" in source and ('open(' in source and '"a"' in source or "append_jsonl" in source)
        if path.name == "machine.py" or not writes:
            continue
        names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
        assert names & {"append_jsonl", "with_machine", "machine_info"}, f"{path.name} writes rows without the machine"


# ---------------------------------------------------------------------------------------------- bf16 inference
def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=-1).min().item()


@pytest.mark.parametrize("preset", ["tiny", "tiny-rn"])
def test_bf16_towers_match_fp32(preset, one_thread):
    """Every tensor randomised; bf16 towers give float32 features within a cosine of 0.999 of fp32's, through the
    fast paths (no_grad, eval) and the plain ones, pooled and per token."""
    from clip_pacl.checkpoint.io import set_precision
    from helpers import randomize_

    model = randomize_(clip_pacl_load(preset)).eval()
    images = torch.randn(3, 3, model.image_size, model.image_size)
    texts = model.get_tokenizer()(["a red circle", "two blue squares and a green star", "x"])
    with torch.no_grad():
        ref = model.encode_image(images), model.encode_text(texts), model.encode_image_tokens(images)
        assert set_precision(model, "bf16") is model and model.precision == "bf16"
        assert model.tower_dtype is torch.bfloat16 and model.logit_scale.dtype is torch.float32
        got = model.encode_image(images), model.encode_text(texts), model.encode_image_tokens(images)
    plain = model.encode_image(images)  # autograd on: the towers' plain definitions (eval-mode BatchNorm)
    for a, b in zip(ref, got):
        assert b.dtype is torch.float32 and b.shape == a.shape
        assert _cosine(a, b) >= 0.999
    assert _cosine(ref[0], plain) >= 0.999


def test_fp32_is_the_default_and_unchanged(one_thread):
    model = clip_pacl_load("tiny").eval()
    assert model.precision == "fp32" and model.tower_dtype is torch.float32
    images = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), model.visual(images, fast=True))


def test_pacl_bf16_keeps_its_embedders_fp32(one_thread):
    from clip_pacl.checkpoint.io import set_precision
    from clip_pacl.models.pacl import PACL
    from helpers import randomize_

    model = randomize_(PACL(clip_pacl_load("tiny"))).eval()
    images = torch.randn(2, 3, model.image_size, model.image_size)
    texts = model.clip.get_tokenizer()(["a red circle", "a blue star"])
    with torch.no_grad():
        ref = model.patch_similarity(images, model.encode_text(texts))
        set_precision(model, "bf16")
        got = model.patch_similarity(images, model.encode_text(texts))
    assert model.clip.tower_dtype is torch.bfloat16
    assert next(model.vision_embedder.parameters()).dtype is torch.float32
    assert got.dtype is torch.float32 and (got - ref).abs().max().item() < 0.02  # cosines in [-1, 1]


def test_bf16_refusals(tmp_path):
    model = clip_pacl_load("tiny", precision="bf16")
    assert model.precision == "bf16"
    with pytest.raises(ConfigError, match="load it at fp32"):
        clip_pacl.save(model, tmp_path / "out")
    with pytest.raises(ConfigError, match="pick one"):
        clip_pacl_load("tiny", quantize="int8", precision="bf16")
    with pytest.raises(ConfigError, match="fp32, bf16, auto"):
        clip_pacl_load("tiny", precision="half")
    assert clip_pacl_load("tiny", quantize="int8", precision="auto").precision == "fp32"


def clip_pacl_load(name, **kwargs):
    """A preset with random weights, asked for explicitly (and quietly: the tests know the weights are random)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return clip_pacl.load(name, **kwargs)



@pytest.mark.parametrize("flags, expected", [({"avx2"}, "fp32"), ({"avx2", "amx_bf16"}, "bf16")])
def test_train_auto_precision_resolves_once_and_says_so(flags, expected, monkeypatch, tmp_path, capsys, one_thread):
    from clip_pacl.data.synthetic import generate_synthetic
    from clip_pacl.train import TrainConfig, train

    monkeypatch.setattr(dev, "cpu_flags", lambda: flags)
    data = generate_synthetic(tmp_path / "data", n=16, seed=0, image_size=32)
    seen = []
    real_autocast = torch.autocast

    def spy(device_type, dtype=None, enabled=True, **kwargs):
        seen.append(dtype if enabled else None)
        return real_autocast(device_type, dtype=dtype, enabled=enabled, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    train(TrainConfig(data=str(data.captions), model="tiny", out=str(tmp_path / "run"), steps=2, batch_size=8,
                      device="cpu", progress=False, precision="auto"))
    err = capsys.readouterr().err
    assert f"precision: {expected}" in err and "(auto)" in err
    assert seen and set(seen) == {torch.bfloat16 if expected == "bf16" else None}


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from PIL import Image

    from helpers import randomize_

    root = tmp_path_factory.mktemp("precision")
    clip_pacl.save(randomize_(clip_pacl_load("tiny")), root / "ckpt")
    images = root / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (40, 40), colour).save(images / f"{i}.png")
    return root


def _cli(capsys, *argv):
    from clip_pacl_app.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("precision", ["bf16", "auto"])
def test_inference_commands_run_at_the_precision_asked_and_say_so(tiny_ckpt, precision, capsys, monkeypatch,
                                                                  one_thread):
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx2"})  # auto: fp32 on a CPU without native bf16
    ran = "bf16" if precision == "bf16" else "fp32"
    model, image = tiny_ckpt / "ckpt", tiny_ckpt / "images" / "0.png"
    code, out, err = _cli(capsys, "zeroshot", "--model", model, image, "--classes", "red,blue", "--json",
                          "--precision", precision)
    assert code == 0 and f"precision: {ran}" in err
    probs = json.loads(out)
    code, out, err = _cli(capsys, "zeroshot", "--model", model, image, "--classes", "red,blue", "--json")
    assert code == 0 and "precision:" not in err  # the default, exact fp32, says nothing
    assert json.dumps(probs, sort_keys=True)[:20] == json.dumps(json.loads(out), sort_keys=True)[:20]
    # an index built at bf16 records it, keeps the float32 weights' fingerprint and is searched at fp32
    idx = tiny_ckpt / f"idx-{precision}"
    code, out, err = _cli(capsys, "index", "build", "--model", model, "--images", tiny_ckpt / "images", "--out", idx,
                          "--precision", precision, "--json")
    assert code == 0 and json.loads(out)["precision"] == ran and f"precision: {ran}" in err
    code, out, err = _cli(capsys, "search", idx, "red", "--json", "-k", "2")
    assert code == 0 and len(json.loads(out)["results"]) == 2 and "precision:" not in err
    code, out, err = _cli(capsys, "search", idx, "red", "--json", "-k", "2", "--precision", "bf16")
    assert code == 0 and "precision: bf16" in err


def test_precision_flag_refusals(tiny_ckpt, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal, with the choices
        _cli(capsys, "zeroshot", "--model", tiny_ckpt / "ckpt", tiny_ckpt / "images" / "0.png", "--classes", "a,b",
             "--precision", "half")
    assert exit_info.value.code == 2 and "fp32', 'bf16', 'auto'" in capsys.readouterr().err
    code, _, err = _cli(capsys, "zeroshot", "--model", tiny_ckpt / "ckpt", tiny_ckpt / "images" / "0.png",
                        "--classes", "a,b", "--precision", "bf16", "--int8")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and "pick one" in err
    # the commands that load float32 first (the index's fingerprint) and set the precision afterwards refuse it too
    idx = tiny_ckpt / "idx-int8"
    code, _, err = _cli(capsys, "index", "build", "--model", tiny_ckpt / "ckpt", "--images", tiny_ckpt / "images",
                        "--out", idx, "--int8", "--precision", "bf16")
    assert code == 2 and "pick one" in err.strip().splitlines()[-1] and not idx.exists()
    code, out, _ = _cli(capsys, "index", "build", "--model", tiny_ckpt / "ckpt", "--images", tiny_ckpt / "images",
                        "--out", idx, "--int8", "--precision", "auto", "--json")
    assert code == 0 and json.loads(out)["precision"] == "fp32" and json.loads(out)["quantize"] == "int8"
    code, _, err = _cli(capsys, "search", idx, "red", "--int8", "--precision", "bf16")
    assert code == 2 and "pick one" in err.strip().splitlines()[-1]
