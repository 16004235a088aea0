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
    expected = clip_loss(*model(images, texts))
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


class _Recorder(L.Callback):
    """The lr and beta1 each optimiser step runs with."""

    def __init__(self):
        self.lrs, self.beta1s = [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.beta1s.append(optimizer.param_groups[0]["betas"][0])


def _fit(module, synthetic, tmp_path, callbacks, **trainer_kwargs):
    data = CaptionDataModule(synthetic / "captions.csv", image_size=64, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
                        limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, data)
    return trainer


def test_by_default_the_module_trains_with_clip_pacl_trains_recipe(synthetic, tmp_path):
    """Same defaults as `clip-pacl train` (TrainConfig): its lr, wd, AdamW moments, and the one-cycle schedule over
    30% warmup, lr and beta1 set per optimiser step."""
    from clip_pacl.train.config import TrainConfig
    from clip_pacl.train.schedule import default_warmup, onecycle_at

    defaults = TrainConfig(data="x", model="tiny", out="y")
    module = CLIPLightningModule(clip_pacl.load("tiny"))
    assert (module.lr, module.weight_decay, module.betas, module.eps) == (
        defaults.lr, defaults.wd, (defaults.beta1, defaults.beta2), defaults.eps)
    recorder = _Recorder()
    _fit(module, synthetic, tmp_path, [recorder], max_steps=10)
    expected = [onecycle_at(step, defaults.lr, default_warmup(10), 10, defaults.beta1) for step in range(10)]
    assert recorder.lrs == pytest.approx([lr for lr, _ in expected], rel=1e-12)
    assert recorder.beta1s == pytest.approx([beta1 for _, beta1 in expected], rel=1e-12)
    assert max(recorder.lrs) == pytest.approx(defaults.lr) and recorder.lrs[-1] < defaults.lr / 1e4


def test_the_cosine_schedule_and_an_explicit_warmup_are_followed(synthetic, tmp_path):
    recorder = _Recorder()
    module = CLIPLightningModule(clip_pacl.load("tiny"), lr=1e-3, warmup_steps=2, schedule="cosine")
    _fit(module, synthetic, tmp_path, [recorder], max_steps=6)
    assert recorder.lrs == pytest.approx([5e-4, 1e-3] + [0.5 * (1 + math.cos(math.pi * k / 4)) * 1e-3
                                                         for k in range(4)])
    assert set(recorder.beta1s) == {module.betas[0]}  # only one-cycle moves beta1


def test_a_run_with_no_known_end_warms_up_then_holds_the_peak():
    """No step or epoch limit (Lightning estimates inf steps): nothing to decay towards, so warmup then constant."""
    from types import SimpleNamespace

    module = CLIPLightningModule(clip_pacl.load("tiny"), lr=1e-3, warmup_steps=4)
    fake = SimpleNamespace(estimated_stepping_batches=float("inf"), global_step=0, optimizers=[])
    module._trainer = fake  # what Lightning attaches during fit
    fake.optimizers.append(module.configure_optimizers())
    assert module.lr_schedule is None
    lrs = []
    for step in range(7):
        fake.global_step = step
        module.on_train_batch_start(None, 0)
        lrs.append(fake.optimizers[0].param_groups[0]["lr"])
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3])


def test_training_images_are_not_cropped_unless_asked(synthetic):
    """`clip-pacl train`'s default: the training images get the evaluation transform; `augment=True` crops."""
    from clip_pacl.data.images import load_image

    plain = CaptionDataModule(synthetic / "captions.csv", image_size=64)
    cropped = CaptionDataModule(synthetic / "captions.csv", image_size=64, augment=True)
    plain.setup(), cropped.setup()
    row = plain.train_set.rows[0]
    expected = plain.val_transform(load_image(row.image))
    assert torch.equal(plain.train_set[(0, 1)][0], expected) and torch.equal(plain.train_set[(0, 2)][0], expected)
    assert not torch.equal(cropped.train_set[(0, 1)][0], cropped.train_set[(0, 2)][0])


def test_an_unknown_schedule_is_a_config_error():
    from clip_pacl.errors import ConfigError

    with pytest.raises(ConfigError, match="schedule must be one of"):
        CLIPLightningModule(clip_pacl.load("tiny"), schedule="linear")
