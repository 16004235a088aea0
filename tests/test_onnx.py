"""`clip-pacl export onnx`: onnxruntime gives the same features as torch, for any caption length."""

import json

import numpy as np
import pytest
import torch

import clip_pacl
from clip_pacl.tokenizer import tokenize
from clip_pacl_app.cli.main import main
from helpers import randomize_, require

ort = require("onnxruntime")

CAPTIONS = [
    "a",
    "a photo of a cat",
    "a diagram of two dogs playing in the long grass near a river at sunset",
    " ".join(["a very long caption that runs past the context of the text tower"] * 8),  # truncated at 77
]


@pytest.mark.parametrize("preset", ["tiny", "tiny-rn"])
def test_onnx_encoders_match_torch(preset, tmp_path, capsys):
    clip_pacl.save(randomize_(clip_pacl.load(preset)), tmp_path / "ckpt")
    model = clip_pacl.load(tmp_path / "ckpt").eval()
    assert main(["export", "onnx", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "onnx"),
                 "--json"]) == 0  # the batch is dynamic by default: batches of 1 and 3 below
    meta = json.loads(capsys.readouterr().out)
    on_disk = json.loads((tmp_path / "onnx" / "clip_onnx.json").read_text())
    assert on_disk["context_length"] == 77 and on_disk["image_size"] == 64 and on_disk["embed_dim"] == 128
    assert on_disk["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073]) and meta["opset"] == 17
    assert on_disk["image_input"]["shape"] == ["batch", 3, 64, 64] and on_disk["text_input"]["shape"] == ["batch", 77]
    image_session = ort.InferenceSession(str(tmp_path / "onnx" / meta["image_encoder"]))
    text_session = ort.InferenceSession(str(tmp_path / "onnx" / meta["text_encoder"]))

    images = torch.randn(3, 3, 64, 64)
    tokens = tokenize(CAPTIONS)
    with torch.no_grad():
        image_ref = model.encode_image(images, normalize=True).numpy()
        text_ref = model.encode_text(tokens, normalize=True).numpy()
    image_out = image_session.run(None, {"image": images.numpy()})[0]
    np.testing.assert_allclose(image_out, image_ref, atol=1e-4)
    np.testing.assert_allclose(image_session.run(None, {"image": images[:1].numpy()})[0], image_ref[:1], atol=1e-4)
    # Every length alone (a batch of one has its own, shorter, truncation in torch) and all together.
    for row in range(len(CAPTIONS)):
        text_out = text_session.run(None, {"text": tokens[row : row + 1].numpy()})[0]
        np.testing.assert_allclose(text_out, text_ref[row : row + 1], atol=1e-4)
    np.testing.assert_allclose(text_session.run(None, {"text": tokens.numpy()})[0], text_ref, atol=1e-4)


def test_static_batch_and_opset(tmp_path, capsys):
    assert main(["export", "onnx", "--model", "tiny", "--random-weights",
                 "--out", str(tmp_path), "--opset", "18", "--static-batch"]) == 0
    assert "image_encoder.onnx" in capsys.readouterr().out
    import onnx

    graph = onnx.load(str(tmp_path / "text_encoder.onnx"))
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) == 18
    session = ort.InferenceSession(str(tmp_path / "image_encoder.onnx"))
    assert session.get_inputs()[0].shape == [1, 3, 64, 64]
    meta = json.loads((tmp_path / "clip_onnx.json").read_text())
    assert meta["image_input"]["shape"] == [1, 3, 64, 64] and meta["text_input"]["shape"] == [1, 77]


def test_export_leaves_the_model_as_it_was(tmp_path):
    """The exporter restores the exported module's mode recursively; an eval model must stay in eval mode."""
    from clip_pacl.formats.onnx import export_onnx

    model = clip_pacl.load("tiny-rn").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path)
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
