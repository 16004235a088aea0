"""CLIP guidance: optimising pixels with it raises the similarity to the prompt, far more than to a control prompt."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import clip_pacl
from clip_pacl.errors import ConfigError
from clip_pacl.guidance import CLIPGuidance, spherical_distance_loss
from clip_pacl.models.pacl import PACL
from hf_clip_dir import write_hf_clip

PROMPTS = ["a blue square", "a photo of a dog on a beach"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return clip_pacl.load("tiny").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A random tiny CLIP (transformers' initialisation) whose two PROMPTS embed far apart (cosine 0.49); the
    random `tiny` preset embeds every prompt within cosine 0.85 of every other, so no guidance could separate them."""
    path = tmp_path_factory.mktemp("hf") / "clip"
    write_hf_clip(path, image_size=32)
    return clip_pacl.load(path).eval().requires_grad_(False)


def _guide(model, prompt: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on the pixels of a noise image; (cosines to PROMPTS before (2,), after (2,))."""
    guidance = CLIPGuidance(model, prompt, cutouts=8, generator=torch.Generator().manual_seed(0))
    probe = CLIPGuidance(model, PROMPTS, cutouts=1)
    size = model.image_size
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    before = probe.similarity(pixels)[0]
    return before, probe.similarity(guidance.optimize_pixels(pixels, steps, lr=0.05))[0]


def test_guided_pixels_move_toward_the_prompt_not_the_control(hf_tiny, one_thread):
    """The same noise guided to each prompt in turn: each prompt's cosine rises clearly, and ends higher when
    guided to it than when guided to the other (a random model lifts every prompt somewhat: a shared direction)."""
    before, to_first = _guide(hf_tiny, PROMPTS[0], steps=150)
    _, to_second = _guide(hf_tiny, PROMPTS[1], steps=150)
    print(f"before {before.tolist()}  guided to {PROMPTS[0]!r}: {to_first.tolist()}  "
          f"guided to {PROMPTS[1]!r}: {to_second.tolist()}")
    assert to_first[0] - before[0] > 0.15 and to_second[1] - before[1] > 0.15
    assert to_first[0] - before[0] > 1.2 * (to_first[1] - before[1])  # the control rose less
    assert to_first[0] > to_second[0] + 0.03 and to_second[1] > to_first[1] + 0.02


def test_loss_is_the_mean_spherical_distance_and_grad_is_its_gradient(tiny):
    x, y = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    angle = torch.arccos((x * y).sum(-1).clamp(-1, 1))
    assert torch.allclose(spherical_distance_loss(x, y), angle**2 / 2, atol=1e-5)  # 2 arcsin(|x-y|/2)^2 = theta^2/2

    images = torch.rand(2, 3, 80, 72)
    guidance = CLIPGuidance(tiny, PROMPTS, cutouts=4, weights=[1.0, 3.0],
                            generator=torch.Generator().manual_seed(0))
    cutouts = guidance.make_cutouts(images)
    assert cutouts.shape == (8, 3, 64, 64)
    guidance.generator.manual_seed(0)
    loss = guidance(images)
    with torch.no_grad():
        from clip_pacl.preprocess import normalize_pixels

        features = tiny.encode_image(normalize_pixels(tiny, cutouts), normalize=True).view(4, 2, 1, -1)
    expected = (spherical_distance_loss(features, guidance.text_features).mean(0) * torch.tensor([0.25, 0.75])).sum(-1)
    assert loss.dim() == 0 and torch.allclose(loss, expected.mean(), atol=1e-5)

    guidance.generator.manual_seed(0)
    grad = guidance.grad(images)
    guidance.generator.manual_seed(0)
    x = images.clone().requires_grad_(True)
    guidance(x).backward()
    assert grad.shape == images.shape and grad.abs().sum() > 0 and torch.allclose(grad, x.grad)


def test_bad_settings_and_gradient_free_models_are_refused(tiny):
    with pytest.raises(ConfigError, match="at least one prompt"):
        CLIPGuidance(tiny, [])
    with pytest.raises(ConfigError, match="need as many weights"):
        CLIPGuidance(tiny, PROMPTS, weights=[1.0])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        CLIPGuidance(tiny, "x")(torch.rand(3, 64, 64))
    pacl = PACL(tiny).eval()  # its CLIP is frozen: no gradient reaches the pixels
    with pytest.raises(ConfigError, match="passes no gradient"):
        CLIPGuidance(pacl, "x")


def test_example_script_writes_before_and_after(tmp_path):
    out = tmp_path / "guided"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "guided_pixels.py"), "--model", "tiny", "--prompt",
                           "a red circle", "--steps", "2", "--cutouts", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cosine to 'a red circle'" in proc.stdout
    for name in ("before.png", "after.png"):
        with Image.open(out / name) as image:
            assert image.size == (64, 64)
    assert (out / "before.png").read_bytes() != (out / "after.png").read_bytes()
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "guided_pixels.py"), "--model", "nope-model",
                           "--prompt", "x", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
