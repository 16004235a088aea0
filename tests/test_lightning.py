"""The Lightning integration trains the same model with the same loss (skipped without the extra)."""

import math

import pytest
import torch

from helpers import require

L = require("lightning")

import clip_pacl  # noqa: E402
from clip_pacl.data.synthetic import generate_synthetic  # noqa: E402
from clip_pacl.integrations.lightning import CaptionDataModule, CLIPLightningModule  # noqa: E402
from clip_pacl.losses.clip import clip_loss  # noqa: E402
from clip_pacl.tokenizer import tokenize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, n=12, seed=0, image_size=64)
    return out


def test_forward_is_the_clip_loss():
    model = clip_pacl.load("tiny")
    module = CLIPLightningModule(model, objective="clip")
    images, texts = torch.randn(3, 3, 64, 64), tokenize(["a", "b c", "d e f"])
    expected = clip_loss(*model.loss_features(images, texts), model.logit_scale)
    assert torch.allclose(module(images, texts), expected)


def test_fast_dev_run_trains_two_steps(synthetic, tmp_path):
    model = clip_pacl.load("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # above CLIP's clamp: the module must bring it back to ln(100)
    module = CLIPLightningModule(model, lr=1e-3, warmup_steps=1)
    data = CaptionDataModule(synthetic / "captions.csv", image_size=64, batch_size=4, val_fraction=0.25)
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/loss" in trainer.callback_metrics
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k]) and k != "logit_scale"]
    assert "visual.conv1.weight" in changed and "text.token_embedding.weight" in changed
    assert 4.5 < model.logit_scale.item() <= math.log(100.0) + 1e-6  # clamped after each step
