"""WiSE-FT merging: the interpolation itself, architecture checks, and the `clip-pacl merge` command."""

import json

import pytest
import torch

import clip_pacl
from clip_pacl.checkpoint.merge import merge_models, merge_weights
from clip_pacl.errors import CheckpointError
from clip_pacl_app.cli.main import main
from helpers import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")


def test_merge_weights_interpolates_floats_and_keeps_dtypes():
    a = {"w": torch.zeros(3), "h": torch.full((2,), 2.0, dtype=torch.float16), "step": torch.tensor(1)}
    b = {"w": torch.ones(3), "h": torch.full((2,), 4.0, dtype=torch.float16), "step": torch.tensor(7)}
    merged = merge_weights(a, b, 0.25)
    assert torch.equal(merged["w"], torch.full((3,), 0.25))
    assert merged["h"].dtype == torch.float16 and torch.equal(merged["h"], torch.full((2,), 2.5, dtype=torch.float16))
    assert merged["step"].item() == 7  # integers cannot be averaged: taken from the fine-tuned side
    assert torch.equal(merge_weights(a, b, 0.0)["w"], a["w"]) and torch.equal(merge_weights(a, b, 1.0)["w"], b["w"])
    with pytest.raises(ValueError, match="alpha must be between 0"):
        merge_weights(a, b, 1.5)


def test_architecture_mismatch_names_the_tensor():
    a = {"w": torch.zeros(3), "v": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"A and B are different architectures: w is \(3,\) in A but \(4,\) in B"):
        merge_weights(a, {"w": torch.zeros(4), "v": torch.zeros(2)}, 0.5)
    with pytest.raises(CheckpointError, match="v is only in A"):
        merge_weights(a, {"w": torch.zeros(3)}, 0.5)
    with pytest.raises(CheckpointError, match="different architectures"):
        merge_models(clip_pacl.load("tiny"), clip_pacl.load("tiny-rn"), 0.5)


@pytest.fixture
def two_models(tmp_path):
    base = randomize_(clip_pacl.load("tiny"), seed=0)
    finetuned = randomize_(clip_pacl.load("tiny"), seed=1)
    clip_pacl.save(base, tmp_path / "base")
    clip_pacl.save(finetuned, tmp_path / "ft")
    return base, finetuned, tmp_path


def test_cli_writes_the_interpolated_checkpoint(two_models, capsys):
    base, finetuned, tmp = two_models
    code = main(["merge", str(tmp / "base"), str(tmp / "ft"), "--alpha", "0.25", "--out", str(tmp / "wise"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["alpha"] == 0.25 and result["tensors"] == len(base.state_dict())
    merged = clip_pacl.load(tmp / "wise")
    for key, value in merged.state_dict().items():
        expected = 0.75 * base.state_dict()[key] + 0.25 * finetuned.state_dict()[key]
        assert torch.allclose(value, expected, atol=1e-6), key
    at_zero = merge_models(base, finetuned, 0.0)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(at_zero.encode_image(images), base.encode_image(images))


def test_cli_errors_are_one_line(two_models, capsys, tmp_path):
    _, _, tmp = two_models
    clip_pacl.save(clip_pacl.load("tiny-rn"), tmp / "rn")
    assert main(["merge", str(tmp / "base"), str(tmp / "rn"), "--out", str(tmp / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "different architectures" in err and "\n" not in err
    assert main(["merge", str(tmp / "base"), str(tmp / "ft"), "--alpha", "2", "--out", str(tmp / "x")]) == 2
    assert capsys.readouterr().err.strip() == "error: --alpha must be between 0 (base) and 1 (fine-tuned), not 2.0"
    assert not (tmp / "x").exists()
