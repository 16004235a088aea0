"""Backbone CLIP: timm image tower + transformers text tower + projection heads, with tiny local towers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import require

require("timm")
transformers = require("transformers")

import timm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import clip_pacl  # noqa: E402
from clip_pacl.checkpoint.backbone import load_backbone  # noqa: E402
from clip_pacl.errors import CheckpointError, ConfigError  # noqa: E402
from clip_pacl.losses.clip import clip_loss  # noqa: E402
from clip_pacl.models.backbone import BackboneCLIP, BackboneConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


WORDS = "a an red green blue circle square star triangle photo of the small large".split()


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A tiny DistilBERT (1 layer, width 32) and its WordPiece tokenizer, as save_pretrained() writes them."""
    folder = tmp_path_factory.mktemp("tiny-distilbert")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = transformers.DistilBertTokenizer(vocab=vocab)
    config = transformers.DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=80)
    torch.manual_seed(0)
    transformers.DistilBertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _spec(text_dir, *options):
    return "+".join(["backbone:timm/test_resnet=random", f"hf={text_dir}", *options])


@pytest.fixture(scope="module")
def model(text_dir):
    torch.manual_seed(0)
    return BackboneCLIP.from_spec(_spec(text_dir, "embed_dim=16", "image_size=32")).eval()


def test_spec_parsing_round_trips_and_errors_are_clear():
    config = BackboneConfig.from_spec("backbone:timm/resnet50+hf/distilbert-base-uncased+embed_dim=512+head=mlp")
    assert config == BackboneConfig("timm/resnet50", "hf/distilbert-base-uncased", embed_dim=512, head="mlp")
    assert config.to_spec() == "backbone:timm/resnet50+hf/distilbert-base-uncased+embed_dim=512+head=mlp"
    assert BackboneConfig.from_spec(config.to_spec()) == config
    assert BackboneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    local = BackboneConfig.from_spec("backbone:timm=/w/rn50+hf=/w/bert")
    assert (local.image, local.text, local.embed_dim, local.head) == ("timm=/w/rn50", "hf=/w/bert", 256, "linear")
    for spec, message in [
        ("backbone:timm/resnet50", "needs exactly one timm image tower and one hf text tower"),
        ("backbone:timm/resnet50+hf/bert+dim=3", "unknown option 'dim=3'"),
        ("backbone:timm/resnet50+hf/bert+embed_dim=big", "embed_dim needs a whole number, not 'big'"),
        ("backbone:timm/resnet50+hf/bert+head=transformer", "head must be linear or mlp"),
    ]:
        with pytest.raises(ConfigError, match=message):
            BackboneConfig.from_spec(spec)


def test_features_are_normalised_and_padding_does_not_change_them(model):
    assert model.image_size == 32 and model.context_length == 77 and model.embed_dim == 16
    assert model.logit_bias is None and math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    tokens = model.tokenize(["a red circle", "a photo of the small blue star"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert (tokens[0, 5:] == model.pad_id).all() and tokens[0, 0] != model.pad_id
    images = torch.randn(2, 3, 32, 32)
    out = model(images, tokens)
    assert out.image_features.shape == out.text_features.shape == (2, 16)
    assert torch.allclose(out.text_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        short = model.encode_text(tokens[:, :12])  # the same texts with fewer pad columns
    assert torch.allclose(short, model.encode_text(tokens), atol=1e-5)
    scores = model.similarity(images, out.text_features)
    assert torch.allclose(scores, out.image_features @ out.text_features.T, atol=1e-5)


def test_towers_come_from_the_named_local_weights(text_dir, tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    save_file(reference.state_dict(), str(tmp_path / "rn.safetensors"))
    timm.models.save_for_hf(reference, str(tmp_path / "timm_dir"), safe_serialization=True)
    text_ref = transformers.AutoModel.from_pretrained(text_dir)
    for image_spec in (f"timm/test_resnet={tmp_path / 'rn.safetensors'}", f"timm={tmp_path / 'timm_dir'}"):
        built = BackboneCLIP.from_spec(f"backbone:{image_spec}+hf={text_dir}")
        for key, value in reference.state_dict().items():
            assert torch.equal(built.visual.state_dict()[key], value), (image_spec, key)
        for key, value in text_ref.state_dict().items():
            assert torch.equal(built.text.state_dict()[key], value), key
        assert built.image_info["arch"] == "test_resnet"


def test_missing_towers_are_one_clear_error(text_dir, tmp_path):
    with pytest.raises(CheckpointError, match="text model folder .*nope does not exist"):
        BackboneCLIP.from_spec(f"backbone:timm/test_resnet=random+hf={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="timm has no model 'not_a_model'"):
        BackboneCLIP.from_spec(f"backbone:timm/not_a_model=random+hf={text_dir}")
    with pytest.raises(CheckpointError, match="image weights .*missing.safetensors do not exist"):
        BackboneCLIP.from_spec(f"backbone:timm/test_resnet={tmp_path / 'missing.safetensors'}+hf={text_dir}")
    with pytest.raises(CheckpointError, match="is not a timm model folder"):
        BackboneCLIP.from_spec(f"backbone:timm={tmp_path}+hf={text_dir}")


def test_image_transform_uses_the_image_models_size_and_normalisation(model):
    grey = Image.fromarray(np.full((50, 40, 3), 128, np.uint8))
    for train in (False, True):
        pixels = model.image_transform(train)(grey)
        assert pixels.shape == (3, 32, 32)
        mean, std = model.data_config["mean"], model.data_config["std"]
        expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(mean, std)])
        assert torch.allclose(pixels.mean(dim=(1, 2)), expected, atol=1e-3)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_a_few_steps_learn_to_match_pairs(text_dir, head):
    torch.manual_seed(0)
    model = BackboneCLIP.from_spec(_spec(text_dir, "embed_dim=16", "image_size=32", f"head={head}", "pool=mean"))
    model.train()
    images = torch.randn(4, 3, 32, 32)
    texts = model.tokenize(["a red circle", "a blue square", "a green star", "a small triangle"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(8):
        loss = clip_loss(*model.loss_features(images, texts), model.logit_scale.exp(), model.logit_bias)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    heads = [p for name, p in model.named_parameters() if name.startswith(("image_head.", "text_head."))]
    assert model.logit_scale.grad is not None and all(p.grad is not None for p in heads)
    assert losses[-1] < 0.5 * losses[0]


def test_checkpoint_round_trip_through_clip_pacl_load(model, tmp_path):
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    clip_pacl.save(model, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "backbone" and cfg["backbone"]["embed_dim"] == 16
    loaded = clip_pacl.load(tmp_path / "ckpt").eval()
    assert isinstance(loaded, BackboneCLIP) and loaded.image_size == 32 and loaded.logit_scale.item() == 3.0
    texts = ["a red circle", "the large green square"]
    assert torch.equal(loaded.tokenize(texts), model.tokenize(texts))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(images, model.tokenize(texts)), loaded(images, loaded.tokenize(texts))
    assert torch.allclose(a.image_features, b.image_features, atol=1e-6)
    assert torch.allclose(a.text_features, b.text_features, atol=1e-6)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "backbone"}))
    with pytest.raises(CheckpointError, match="is not a backbone checkpoint"):
        load_backbone(tmp_path / "ckpt")


def test_a_config_declaring_a_large_tower_is_refused_before_it_is_built(model, tmp_path):
    """A 16 KB text config declaring a 6.4 GB DistilBERT around the tiny weights: the towers are built on the meta
    device and compared with the weights file first (issue 21, item 6), in a child process with bounded memory."""
    from test_hostile_files import RSS_BOUND, SECONDS_BOUND, run_cases

    clip_pacl.save(model, tmp_path / "ckpt")
    text_config = tmp_path / "ckpt" / "text" / "config.json"
    text_config.write_text(json.dumps({**json.loads(text_config.read_text()), "dim": 4096, "n_layers": 24}))
    result = run_cases({"backbone": ["info", str(tmp_path / "ckpt")]}, tmp_path)["backbone"]
    assert result["code"] == 2 and "does not match the model: size mismatch" in result["stderr"], result["stderr"]
    assert len(result["stderr"].strip().splitlines()) == 1
    # timm and transformers import and build the small real towers inside this bound; the declared tower is 6.4 GB
    assert result["rss_growth"] < 2 * RSS_BOUND and result["seconds"] < SECONDS_BOUND


def test_clip_pacl_load_builds_from_a_spec(text_dir):
    built = clip_pacl.load(_spec(text_dir, "embed_dim=8"))
    assert isinstance(built, BackboneCLIP) and built.embed_dim == 8 and built.config.image == "timm/test_resnet=random"


def test_wise_ft_merges_backbone_models(text_dir, tmp_path):
    from clip_pacl.checkpoint.merge import merge_models

    torch.manual_seed(0)
    base = BackboneCLIP.from_spec(_spec(text_dir, "embed_dim=8", "image_size=32"))
    torch.manual_seed(1)
    finetuned = BackboneCLIP.from_spec(_spec(text_dir, "embed_dim=8", "image_size=32"))
    merged = merge_models(base, finetuned, 0.5)
    clip_pacl.save(merged, tmp_path / "wise")
    reloaded = clip_pacl.load(tmp_path / "wise")
    for key in ("image_head.weight", "text_head.weight", "visual.conv1.0.weight"):
        expected = (base.state_dict()[key] + finetuned.state_dict()[key]) / 2
        assert torch.allclose(reloaded.state_dict()[key], expected, atol=1e-6), key


def test_clip_pacl_train_feeds_a_backbone_its_own_tokenizer_and_transform(text_dir, tmp_path):
    """`clip-pacl train --model backbone:...` runs end to end and validates with the backbone's preprocessing."""
    from clip_pacl.data.synthetic import generate_synthetic
    from clip_pacl.train import TrainConfig, train

    generate_synthetic(tmp_path / "syn", 24, seed=0)
    result = train(TrainConfig(
        data=str(tmp_path / "syn" / "captions.csv"), model=_spec(text_dir), out=str(tmp_path / "run"), steps=2,
        batch_size=8, lr=1e-3, warmup=1, val_fraction=0.25, progress=False,
    ))
    assert result.steps == 2 and result.final_loss is not None
    assert result.val is not None and 0.0 <= result.val["text_to_image_R@1"] <= 1.0
    reloaded = clip_pacl.load(result.final_model)
    assert type(reloaded).__name__ == "BackboneCLIP"


def test_lock_image_freezes_a_timm_tower_but_not_the_heads(model):
    from clip_pacl.train.optim import lock_image_tower

    lock_image_tower(model, unlocked_groups=1)
    visual = [p.requires_grad for p in model.visual.parameters()]
    assert any(visual) and not all(visual)  # only the last parameter-holding child is unlocked
    assert all(p.requires_grad for p in model.image_head.parameters())
    lock_image_tower(model)
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for p in model.text.parameters())
    model.requires_grad_(True)


def test_search_by_image_uses_the_models_own_preprocessing(model, tmp_path):
    """An index built with the timm model's transform must be queried with it: searching with an indexed image
    finds that image at cosine 1 (CLIP's mean/std or size would give other features)."""
    from clip_pacl.retrieval import build_index
    from clip_pacl.retrieval.search import search_image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(paths[-1])
    index, _ = build_index(model, paths, progress=False)
    hits = search_image(index, model, paths[1], k=1)
    assert Path(hits[0].path).name == "1.png" and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_backbone_is_a_contrastive_model(model):
    from clip_pacl.models.protocol import ContrastiveModel

    assert isinstance(model, ContrastiveModel) and model.model_type == "backbone"
