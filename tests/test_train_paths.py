"""The training loop's less travelled paths, run through `clip-pacl train` on CPU: fp16 with its GradScaler, bf16,
gradient checkpointing, --val-data, --lock-text, and the flags that do not apply to a run."""

import json
import math
from pathlib import Path

import pytest
import torch

import clip_pacl
from clip_pacl.data import read_caption_rows
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.retrieval.evaluate import evaluate_retrieval
from clip_pacl.train import checkpointing, loop
from clip_pacl_app.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, 16, seed=0, image_size=64)
    return out / "captions.csv"


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "tiny", "--steps", "2", "--batch-size", "8",
            "--lr", "1e-3", "--warmup", "1", "--log-every", "1", "--no-progress", "--device", "cpu", *extra]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _initial(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # what the loop does before building the model
    return clip_pacl.load("tiny").state_dict()


def _state(path: Path) -> dict[str, torch.Tensor]:
    return clip_pacl.load(path).state_dict()


def _record_grad_norms(monkeypatch) -> list[float]:
    """The gradient norm the optimiser steps with, each step (a pre-hook on the run's AdamW). A fused AdamW under a
    GradScaler may get still-scaled gradients and divide by `grad_scale` itself: the norm is then taken unscaled."""
    norms: list[float] = []
    build = loop.build_optimizer

    def build_and_watch(model, *args, **kwargs):
        optimizer = build(model, *args, **kwargs)

        def hook(opt, *_):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = getattr(opt, "grad_scale", None)
            norms.append(float(norm / scale if scale is not None else norm))

        optimizer.register_step_pre_hook(hook)
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", build_and_watch)
    return norms


def test_fp16_unscales_before_clipping(synthetic, tmp_path, monkeypatch):
    """With --precision fp16 the clip acts on the true gradient: AdamW sees norm == --grad-clip, not clip / scale."""
    norms = _record_grad_norms(monkeypatch)
    assert main(_args(synthetic, tmp_path / "run", "--precision", "fp16", "--grad-clip", "0.001")) == 0
    # (a step whose fp16 gradient overflowed reaches the fused AdamW as inf/NaN, which skips it on the device)
    finite = [n for n in norms if math.isfinite(n)]
    assert len(norms) == 2 and finite and finite == pytest.approx([0.001] * len(finite), rel=1e-3)


def test_fp16_skips_a_step_whose_gradient_is_inf_and_resume_restores_the_scale(synthetic, tmp_path, monkeypatch):
    """An inf gradient at step 1: the GradScaler skips that step (weights unchanged), halves its scale, and the
    checkpoint keeps that scale; a run resumed from step 1 continues with it and ends like the uninterrupted run."""
    real = loop.accumulate_gradients
    steps: list[int] = []

    def inf_at_first_step(feature_model, *args, **kwargs):
        loss = real(feature_model, *args, **kwargs)
        steps.append(len(steps) + 1)
        if steps[-1] == 1:
            feature_model.model.text.text_projection.grad[0, 0] = float("inf")
        return loss

    monkeypatch.setattr(loop, "accumulate_gradients", inf_at_first_step)
    out = tmp_path / "run"
    assert main(_args(synthetic, out, "--precision", "fp16", "--save-every", "1", "--keep", "3")) == 0
    first, second = (out / "checkpoints" / f"step_0000000{i}" for i in (1, 2))
    start, after_one, after_two = _initial(), _state(first), _state(second)
    for name, value in start.items():
        assert torch.equal(value, after_one[name]), name  # the step was skipped
    assert any(not torch.equal(value, after_two[name]) for name, value in start.items())  # step 2 was taken
    scale = checkpointing.load_train_state(first)["scaler"]["scale"]
    assert scale == 2.0**15 and checkpointing.load_train_state(second)["scaler"]["scale"] == scale
    # resume from step 1 (step 2 deleted): the restored scaler carries the halved scale into step 2
    monkeypatch.setattr(loop, "accumulate_gradients", real)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (first).rename(resumed / "checkpoints" / first.name)
    assert main([*_args(synthetic, resumed, "--precision", "fp16", "--save-every", "1"), "--resume", "auto"]) == 0
    again = checkpointing.latest_checkpoint(resumed)
    assert checkpointing.load_train_state(again)["scaler"]["scale"] == scale
    for name, value in after_two.items():
        assert torch.allclose(value, _state(again)[name], atol=1e-6), name


def test_bf16_autocast_trains_close_to_fp32(synthetic, tmp_path):
    assert main(_args(synthetic, tmp_path / "fp32")) == 0
    assert main(_args(synthetic, tmp_path / "bf16", "--precision", "bf16")) == 0
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert bf16[0] != fp32[0]  # autocast did run in bf16 ...
    assert bf16 == pytest.approx(fp32, abs=0.05)  # ... and the loss is still the same loss


def test_grad_checkpointing_recomputes_and_trains_to_the_same_weights(synthetic, tmp_path, monkeypatch):
    calls: list[int] = []
    build = loop.build_model

    def build_and_count(*args, **kwargs):
        model, config = build(*args, **kwargs)
        block = model.visual.transformer.resblocks[0]
        forward = block.forward

        def counted(*a, **kw):  # (forward hooks do not see the recomputation)
            calls.append(1)
            return forward(*a, **kw)

        block.forward = counted
        return model, config

    monkeypatch.setattr(loop, "build_model", build_and_count)
    assert main(_args(synthetic, tmp_path / "plain")) == 0
    plain_calls = len(calls)
    assert main(_args(synthetic, tmp_path / "ckpt", "--grad-checkpointing")) == 0
    assert plain_calls == 2 and len(calls) - plain_calls == 4  # each block's forward runs again in backward
    plain, checkpointed = _state(tmp_path / "plain" / "final"), _state(tmp_path / "ckpt" / "final")
    for name, value in plain.items():
        assert torch.allclose(value, checkpointed[name], atol=1e-6), name


def test_val_data_is_what_validation_scores(synthetic, tmp_path, capsys):
    generate_synthetic(tmp_path / "val", 12, seed=1, image_size=64)
    val = tmp_path / "val" / "captions.csv"
    out = tmp_path / "run"
    assert main([*_args(synthetic, out, "--val-data", str(val), "--val-every", "1"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = evaluate_retrieval(clip_pacl.load(out / "final"), read_caption_rows(val), batch_size=32,
                                  progress=False)
    assert summary["val"]["text_to_image_R@1"] == pytest.approx(expected["text_to_image_R@1"])
    assert summary["val"]["mean_recall"] == pytest.approx(expected["mean_recall"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("val_text_to_image_R@1" in r for r in logged)


def test_lock_text_leaves_the_text_tower_untouched(synthetic, tmp_path):
    out = tmp_path / "run"
    assert main(_args(synthetic, out, "--lock-text")) == 0
    start, trained = _initial(), _state(out / "final")
    text = [n for n in start if n.startswith("text.")]
    assert text and all(torch.equal(start[n], trained[n]) for n in text)
    assert not torch.equal(start["visual.proj"], trained["visual.proj"])


@pytest.mark.parametrize("flag", ["--lock-image", "--lock-text"])
def test_locking_a_tower_under_pacl_is_a_clear_error(synthetic, tmp_path, capsys, flag):
    """PACL keeps its CLIP frozen; --lock-image used to crash there with an AttributeError."""
    assert main(_args(synthetic, tmp_path / "run", "--objective", "pacl", flag)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "do not apply to --objective pacl" in err and len(err.splitlines()) == 1


