"""Pieces of a training step: accumulation, parameter groups, the schedule, tower locking, the temperature clamp,
text padding trimmed on the host."""

import math

import pytest
import torch

from clip_pacl import CLIPConfig
from clip_pacl.data import FeatureBatch, TokenBatch
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.losses import get_objective
from clip_pacl.models import CLIP
from clip_pacl.models.pacl import PACL
from clip_pacl.models.text import TextTransformer
from clip_pacl.train import TrainConfig, accumulate_gradients, optim, train
from clip_pacl.train.schedule import StepSchedule, default_warmup, lr_at, onecycle_at
from clip_pacl.train.setup import FeatureModel, batch_inputs


def _tiny(name: str = "tiny") -> CLIP:
    torch.manual_seed(0)
    return CLIP(CLIPConfig.from_name(name))


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 64, 64, generator=g)
    texts = torch.zeros(n, 77, dtype=torch.long)
    texts[:, 0] = 49406
    texts[:, 1:6] = torch.randint(1, 49000, (n, 5), generator=g)
    texts[:, 6] = 49407  # end of text: the highest id, where the text tower pools
    return images, texts


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_accumulation_equals_one_big_batch(objective):
    """accum 2 x B gives the loss and gradients of one batch of 2B: negatives come from every micro-batch."""
    images, texts = _batch(8)
    big, small = _tiny(), _tiny()
    if objective == "siglip":
        for model in (big, small):
            model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    small.load_state_dict(big.state_dict())
    obj = get_objective(objective)
    loss_big = accumulate_gradients(FeatureModel(big), obj, [(images, texts)])
    loss_acc = accumulate_gradients(FeatureModel(small), obj, [(images[:4], texts[:4]), (images[4:], texts[4:])])
    assert torch.allclose(loss_big, loss_acc, atol=1e-5)
    g_big, g_acc = _grads(big), _grads(small)
    assert g_big.keys() == g_acc.keys() and len(g_big) > 10
    for name in g_big:
        assert torch.allclose(g_big[name], g_acc[name], atol=1e-5, rtol=1e-4), name


def test_accumulation_is_not_two_small_batches():
    """The accumulated gradient differs from the sum of two independent small-batch losses (fewer negatives)."""
    images, texts = _batch(8)
    obj = get_objective("clip")
    acc, separate = _tiny(), _tiny()
    accumulate_gradients(FeatureModel(acc), obj, [(images[:4], texts[:4]), (images[4:], texts[4:])])
    for part in (slice(0, 4), slice(4, 8)):
        accumulate_gradients(FeatureModel(separate), obj, [(images[part], texts[part])])
    assert not torch.allclose(acc.logit_scale.grad, separate.logit_scale.grad, atol=1e-4)


def test_no_weight_decay_on_biases_norms_embeddings_and_temperature():
    model = _tiny()
    opt = optim.build_optimizer(model, lr=1e-3, weight_decay=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "logit_scale" in plain and "text.token_embedding.weight" in plain
    assert "visual.positional_embedding" in plain and "visual.ln_pre.weight" in plain
    assert "visual.transformer.resblocks.0.attn.in_proj_bias" in plain
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in decayed and "visual.proj" in decayed
    assert len(decayed) + len(plain) == len(list(model.parameters()))


def test_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, warmup=10, total=110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def test_logit_scale_is_clamped_at_100():
    model = _tiny()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    optim.clamp_logit_scale(model)
    assert float(model.logit_scale.detach()) == pytest.approx(optim.MAX_LOGIT_SCALE)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(100.0, rel=1e-5)


def test_lock_image_keeps_only_the_last_groups_trainable():
    model = _tiny()
    optim.lock_image_tower(model, unlocked_groups=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.proj" in trainable and "visual.ln_post.weight" in trainable
    assert any(n.startswith("visual.transformer.resblocks.3.") for n in trainable)
    assert not any(n.startswith("visual.transformer.resblocks.2.") for n in trainable)
    assert "visual.conv1.weight" not in trainable and "text.token_embedding.weight" in trainable
    optim.lock_text_tower(model)
    assert not any(n.startswith("text.") for n, p in model.named_parameters() if p.requires_grad)
    assert model.logit_scale.requires_grad


def test_locked_resnet_batchnorm_stays_in_eval_mode():
    model = _tiny("tiny-rn")
    optim.lock_image_tower(model, unlocked_groups=1)  # only layer4 and attnpool trainable
    optim.set_train_mode(model)
    assert not model.visual.bn1.training and not model.visual.layer3[0].bn1.training
    assert model.visual.layer4[0].bn1.training and model.visual.attnpool.training and model.text.training
    running = model.visual.bn1.running_mean.clone()
    model.encode_image(torch.randn(2, 3, 64, 64))
    assert torch.equal(running, model.visual.bn1.running_mean)


def test_frozen_towers_get_no_gradient_through_a_step():
    model = _tiny()
    optim.lock_image_tower(model)
    accumulate_gradients(FeatureModel(model), get_objective("clip"), [_batch(4)])
    assert all(p.grad is None for p in model.visual.parameters())
    assert model.text.text_projection.grad is not None and math.isfinite(float(model.logit_scale.grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_step_gives_finite_gradients_close_to_fp32(dtype):
    images, texts = _batch(4)
    ref, amp = _tiny(), _tiny()
    obj = get_objective("clip")
    loss_ref = accumulate_gradients(FeatureModel(ref), obj, [(images, texts)])
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    loss_amp = accumulate_gradients(FeatureModel(amp), obj, [(images, texts)],
                                    lambda: torch.autocast("cpu", dtype=dtype), scaler.scale)
    assert loss_amp.dtype == torch.float32  # the loss itself is computed in fp32
    assert abs(float(loss_amp) - float(loss_ref)) < 0.05
    opt = optim.build_optimizer(amp, lr=1e-3, weight_decay=0.1)
    scaler.unscale_(opt)
    grad = amp.text.text_projection.grad
    assert torch.isfinite(grad).all() and torch.nn.functional.cosine_similarity(
        grad.flatten(), ref.text.text_projection.grad.flatten(), dim=0) > 0.9


def test_trimmed_text_padding_gives_the_same_loss_and_gradients():
    """The loop cuts each host batch of token ids after its longest caption (`batch_inputs`, the model's
    `trim_text_padding`): exact for clip-pacl's causal text tower pooled at EOT, so the step's loss and every
    gradient stay the same."""
    images, texts = _batch(8)
    texts[3, 6:12] = torch.tensor([320, 321, 322, 323, 324, 49407])  # one longer caption: EOT at position 11
    full, cut = _tiny(), _tiny()
    _, trimmed = batch_inputs(cut, TokenBatch(images=images, texts=texts, n_bad=0, n_total=8))
    assert trimmed.shape == (8, 12) and torch.equal(trimmed, texts[:, :12])
    obj = get_objective("clip")
    loss_full = accumulate_gradients(FeatureModel(full), obj, [(images, texts)])
    loss_cut = accumulate_gradients(FeatureModel(cut), obj, [(images, trimmed)])
    assert torch.allclose(loss_full, loss_cut, atol=1e-6)
    g_full, g_cut = _grads(full), _grads(cut)
    assert g_full.keys() == g_cut.keys()
    for name in g_full:
        assert torch.allclose(g_full[name], g_cut[name], atol=1e-5, rtol=1e-4), name
    assert g_full["text.positional_embedding"][12:].abs().max() == 0  # the cut positions never had a gradient
    pacl = PACL(_tiny())
    assert batch_inputs(pacl, TokenBatch(images=images, texts=texts, n_bad=0, n_total=8))[1].shape == (8, 12)
    assert batch_inputs(pacl, TokenBatch(images=images, texts=texts, n_bad=0, n_total=8), 16)[1].shape == (8, 16)
    # cached features (PACL --cache-features) are no token ids: they pass as they are, whatever their shape
    patch_tokens, features = torch.randn(8, 16, 128), torch.randn(8, 128)
    cached = FeatureBatch(patch_tokens=patch_tokens, text_embeddings=features, n_bad=0, n_total=8)
    assert all(a is b for a, b in zip(batch_inputs(pacl, cached), (patch_tokens, features)))


def test_the_loop_feeds_trimmed_text(tmp_path, monkeypatch):
    generate_synthetic(tmp_path / "data", 8, seed=0, image_size=64)
    lengths = []
    forward = TextTransformer.forward
    monkeypatch.setattr(TextTransformer, "forward", lambda self, text: lengths.append(text.shape[1]) or
                        forward(self, text))
    train(TrainConfig(data=str(tmp_path / "data" / "captions.csv"), model="tiny", out=str(tmp_path / "run"), steps=1,
                      batch_size=4, device="cpu", progress=False))
    assert lengths and max(lengths) < 40  # synthetic captions are short: not the 77-token context


def test_default_warmup_is_30_percent_of_a_short_run_and_at_most_10000_steps():
    assert [default_warmup(n) for n in (1, 10, 400, 1000, 33_334, 200_000)] == [1, 3, 120, 300, 10_000, 10_000]


@pytest.mark.parametrize(("warmup", "beta1"), [(120, 0.9), (2, 0.9), (37, 0.8)])
def test_onecycle_equals_pytorchs_one_cycle_lr_in_lr_and_beta1(warmup, beta1):
    total = 400
    reference_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0, betas=(beta1, 0.999))
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_optimizer, max_lr=2e-3, total_steps=total,
                                                    pct_start=warmup / total, base_momentum=beta1 - 0.05,
                                                    max_momentum=beta1 + 0.05)
    ours_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0, betas=(beta1, 0.999))
    ours = StepSchedule(ours_optimizer, 2e-3, warmup, total, kind="onecycle")
    for step in range(total):
        lr = ours.apply(step)
        group, expected = ours_optimizer.param_groups[0], reference_optimizer.param_groups[0]
        assert lr == pytest.approx(expected["lr"], rel=1e-9, abs=1e-15), step
        assert group["betas"][0] == pytest.approx(expected["betas"][0], rel=1e-9), step
        assert group["betas"][1] == 0.999
        reference_optimizer.step()
        reference.step()


@pytest.mark.parametrize("warmup", [0, 1])
def test_onecycle_without_warmup_starts_at_the_peak(warmup):  # where PyTorch's OneCycleLR divides by zero
    lr, beta1 = onecycle_at(0, 1e-3, warmup, 10, 0.9)
    assert lr == pytest.approx(1e-3) and beta1 == pytest.approx(0.85)
    assert onecycle_at(9, 1e-3, warmup, 10, 0.9) == pytest.approx((1e-3 / 25 / 1e4, 0.95))


def test_a_compiled_run_trims_text_to_multiples_of_16_so_it_sees_few_lengths():
    texts, model = torch.zeros(4, 77, dtype=torch.long), _tiny()
    lengths = set()
    for eot in range(1, 77):  # a batch whose longest caption ends at each position in turn
        texts[0] = 0
        texts[0, eot] = 49407
        trimmed = model.trim_text_padding(texts, 16)
        assert trimmed.shape[1] > eot and torch.equal(trimmed, texts[:, : trimmed.shape[1]])
        lengths.add(trimmed.shape[1])
    assert lengths == {16, 32, 48, 64, 77}
    assert model.trim_text_padding(texts, 1).shape[1] == 77
