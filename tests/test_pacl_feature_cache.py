"""--cache-features: the cached CLIP features give exactly the loss features of the un-augmented images."""

import pytest
import torch

import clip_pacl
from clip_pacl.data import FeatureBatch, TokenBatch, build_caption_dataset
from clip_pacl.data.dataset import build_loader
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import ConfigError
from clip_pacl.models.pacl import PACL, PACLConfig
from clip_pacl.tokenizer import get_tokenizer
from clip_pacl.train.feature_cache import CachedFeatureModel, build_feature_cache
from clip_pacl.train.setup import FeatureModel
from clip_pacl.transforms import image_transform


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    generate_synthetic(out, 6, seed=0, captions_per_image=2)
    (out / "images" / "000005.png").write_bytes(b"broken")  # one unreadable image: its rows are skipped
    return out / "captions.csv"


def test_cached_features_match_encoding_the_images(captions):
    model = PACL(clip_pacl.load("tiny")).eval()
    dataset, _ = build_caption_dataset(captions, transform=image_transform(64), tokenizer=get_tokenizer(77))
    cache = build_feature_cache(model, dataset, batch_size=4, dtype=torch.float32)
    assert len(cache) == len(dataset) == 12 and cache.patch_tokens.shape == (6, 64, 128)
    assert cache[10] is None and cache[11] is None  # rows of the broken image
    loader = build_loader(cache, batch_size=4, shuffle=False, workers=0, seed=0, drop_last=False)
    batches = list(loader)
    assert all(isinstance(b, FeatureBatch) for b in batches) and sum(b.n_bad for b in batches) == 2
    assert batches[0].patch_tokens.shape == (4, 64, 128) and batches[0].text_embeddings.shape == (4, 128)
    assert all(isinstance(b, TokenBatch) for b in build_loader(dataset, batch_size=4, shuffle=False, workers=0,
                                                               seed=0, drop_last=False))
    direct_model, cached_model = FeatureModel(model), FeatureModel(CachedFeatureModel(model))
    assert list(cached_model.parameters()) == list(direct_model.parameters())  # DDP sees the PACL's own parameters
    for i in (0, 3, 7):
        pixels, tokens = dataset[i]
        with torch.no_grad():
            direct = direct_model(pixels[None], tokens[None])
            cached = cached_model(*(x[None] for x in cache[(i, 123)]))
        assert len(direct) == len(cached) == 4 and direct[3] is cached[3] is None
        for a, b in zip(direct[:3], cached[:3]):
            assert torch.allclose(a, b, atol=1e-5)


def test_cache_refuses_a_trainable_image_tower_or_a_plain_clip(captions):
    dataset, _ = build_caption_dataset(captions, transform=image_transform(64), tokenizer=get_tokenizer(77))
    unfrozen = PACL(clip_pacl.load("tiny"), PACLConfig(unfreeze_last_n_blocks=1))
    with pytest.raises(ConfigError, match="image tower frozen"):
        build_feature_cache(unfrozen, dataset)
    with pytest.raises(ConfigError, match="objective pacl"):
        build_feature_cache(clip_pacl.load("tiny"), dataset)


@pytest.mark.parametrize("cache_features", [False, True])
def test_clip_pacl_train_objective_pacl_trains_only_the_embedders(captions, tmp_path, cache_features):
    from clip_pacl_app.cli.main import main

    base = tmp_path / "clip"
    clip_pacl.save(clip_pacl.load("tiny"), base)
    argv = ["train", "--objective", "pacl", "--model", str(base), "--data", str(captions), "--out",
            str(tmp_path / "run"), "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--warmup", "0",
            "--no-progress", "--max-bad-fraction", "0.5"]
    assert main(argv + (["--cache-features"] if cache_features else [])) == 0
    trained = clip_pacl.load(tmp_path / "run" / "final")
    untrained = PACL(clip_pacl.load(base))
    assert isinstance(trained, PACL)
    for name, tensor in untrained.clip.state_dict().items():  # the CLIP is frozen
        assert torch.equal(tensor, trained.clip.state_dict()[name]), name
    for embedder in (trained.vision_embedder, trained.text_embedder):  # the linear branch starts as the identity
        assert (embedder.linear.weight - torch.eye(128)).abs().max() > 1e-3


def test_cache_features_needs_the_pacl_objective(captions, tmp_path, capsys):
    from clip_pacl_app.cli.main import main

    rc = main(["train", "--model", "tiny", "--data", str(captions), "--out", str(tmp_path), "--cache-features"])
    assert rc == 2 and "--cache-features is for --objective pacl" in capsys.readouterr().err


def test_pacl_flags_set_the_new_models_config_and_unfreeze_the_last_block(captions, tmp_path, capsys):
    from clip_pacl_app.cli.main import main

    base = tmp_path / "clip"
    clip_pacl.save(clip_pacl.load("tiny"), base)
    argv = ["train", "--objective", "pacl", "--model", str(base), "--data", str(captions), "--steps", "2",
            "--batch-size", "4", "--lr", "1e-2", "--warmup", "0", "--no-progress", "--max-bad-fraction", "0.5"]
    flags = ["--pacl-unfreeze-blocks", "1", "--pacl-pool-temperature", "0.1", "--pacl-patch-tokens", "maskclip"]
    assert main(argv + ["--out", str(tmp_path / "run")] + flags) == 0
    trained = clip_pacl.load(tmp_path / "run" / "final")
    assert (trained.config.unfreeze_last_n_blocks, trained.config.pool_temperature, trained.config.patch_tokens) == (
        1, 0.1, "maskclip")
    before, after = clip_pacl.load(base).state_dict(), trained.clip.state_dict()
    changed = {k.split(".")[3] for k in after
               if k.startswith("visual.transformer") and not torch.equal(after[k], before[k])}
    assert changed == {"3"}  # only the last of the 4 blocks trained
    assert torch.equal(after["visual.conv1.weight"], before["visual.conv1.weight"])
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "run2"), "--cache-features", "--pacl-unfreeze-blocks", "1"]) == 2
    assert "--cache-features needs a frozen image tower" in capsys.readouterr().err
