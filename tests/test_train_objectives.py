"""Which objective a model trains under, and the PACL options of a run: the model declares its objectives (the first
is the default), a mismatch is one line, and every PACL option the user gives is honoured or refused, never
dropped, whether or not it equals a default. The PACL defaults live in PACLConfig only."""

import json
from pathlib import Path

import pytest
import torch

import clip_pacl
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import ConfigError
from clip_pacl.models import CLIP
from clip_pacl.models.pacl import PACL, PACLConfig
from clip_pacl.train import TrainConfig
from clip_pacl.train.config import train_defaults
from clip_pacl_app.cli.main import main


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, 16, seed=0, image_size=64)
    return out / "captions.csv"


@pytest.fixture(scope="module")
def pacl_dirs(tmp_path_factory) -> dict[float, Path]:
    """PACL checkpoints on the tiny CLIP, trained (so to speak) at pool temperatures 1.0 and 0.05."""
    out = tmp_path_factory.mktemp("pacl")
    dirs = {}
    for temperature in (1.0, 0.05):
        torch.manual_seed(0)
        dirs[temperature] = out / f"t{temperature}"
        clip_pacl.save(PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=32, pool_temperature=temperature,
                                                               patch_tokens="tokens")), dirs[temperature])
    return dirs


def _train(data: Path, model: Path | str, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--model", str(model), "--out", str(out), "--steps", "1",
                 "--batch-size", "8", "--lr", "1e-3", "--warmup", "0", "--no-progress", "--device", "cpu", *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_models_declare_their_objectives():
    assert CLIP.objectives == ("clip", "siglip") and PACL.objectives == ("pacl",)


def test_a_pacl_checkpoint_trains_under_pacl_without_being_told(synthetic, pacl_dirs, tmp_path):
    """`train --model PACL_DIR` with no --objective used to die with a RuntimeError traceback (CLIP's loss on patch
    embeddings); the model's own objective is the default."""
    assert _train(synthetic, pacl_dirs[1.0], tmp_path / "run") == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["objective"] == "pacl"
    assert isinstance(clip_pacl.load(tmp_path / "run" / "final"), PACL)


@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_an_objective_the_model_does_not_train_under_is_one_line(synthetic, pacl_dirs, tmp_path, capsys, objective):
    assert _train(synthetic, pacl_dirs[1.0], tmp_path / "run", "--objective", objective) == 2
    err = _one_line_error(capsys)
    assert f"is a PACL model: it trains under --objective pacl, not {objective}" in err
    assert not (tmp_path / "run" / "final").exists()


def test_a_clip_defaults_to_clip_and_builds_a_pacl_when_asked(synthetic, tmp_path):
    assert _train(synthetic, "tiny", tmp_path / "clip") == 0
    assert json.loads((tmp_path / "clip" / "train_config.json").read_text())["objective"] == "clip"
    assert _train(synthetic, tmp_path / "clip" / "final", tmp_path / "pacl", "--objective", "pacl") == 0
    trained = clip_pacl.load(tmp_path / "pacl" / "final")
    assert isinstance(trained, PACL) and trained.config == PACLConfig()  # PACLConfig's own defaults


@pytest.mark.parametrize(("given", "saved"), [(0.05, 1.0), (1.0, 0.05)])
def test_an_explicit_pool_temperature_is_honoured_even_when_it_equals_a_default(synthetic, pacl_dirs, tmp_path,
                                                                               given, saved):
    """0.05 is PACLConfig's default and 1.0 the legacy one: neither may be mistaken for "not given"."""
    args = ["--objective", "pacl", "--pacl-pool-temperature", str(given)]
    assert _train(synthetic, pacl_dirs[saved], tmp_path / "run", *args) == 0
    assert clip_pacl.load(tmp_path / "run" / "final").config.pool_temperature == given


def test_pacl_options_left_out_keep_the_checkpoints_and_a_config_file_counts_as_given(synthetic, pacl_dirs,
                                                                                      tmp_path):
    assert _train(synthetic, pacl_dirs[1.0], tmp_path / "kept") == 0
    kept = clip_pacl.load(tmp_path / "kept" / "final").config
    assert (kept.pool_temperature, kept.patch_tokens, kept.hidden_dim) == (1.0, "tokens", 32)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"pacl-pool-temperature": 0.05, "pacl": {"patch_tokens": "maskclip"}}))
    assert _train(synthetic, pacl_dirs[1.0], tmp_path / "file", "--objective", "pacl", "--config", str(config)) == 0
    changed = clip_pacl.load(tmp_path / "file" / "final").config
    assert (changed.pool_temperature, changed.patch_tokens) == (0.05, "maskclip")


def test_unfreezing_blocks_of_a_pacl_checkpoint_trains_them(synthetic, pacl_dirs, tmp_path):
    args = ["--objective", "pacl", "--pacl-unfreeze-blocks", "1", "--lr", "1e-2"]
    assert _train(synthetic, pacl_dirs[1.0], tmp_path / "run", *args) == 0
    before, after = clip_pacl.load(pacl_dirs[1.0]), clip_pacl.load(tmp_path / "run" / "final")
    assert after.config.unfreeze_last_n_blocks == 1
    last = "clip.visual.transformer.resblocks.3.mlp.c_fc.weight"
    first = "clip.visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.equal(before.state_dict()[last], after.state_dict()[last])
    assert torch.equal(before.state_dict()[first], after.state_dict()[first])


def test_an_option_that_cannot_change_a_trained_pacl_is_refused(synthetic, pacl_dirs, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"pacl": {"hidden_dim": 64}}))
    assert _train(synthetic, pacl_dirs[1.0], tmp_path / "run", "--config", str(config)) == 2
    assert "cannot change a trained PACL (it has hidden_dim=32)" in _one_line_error(capsys)


@pytest.mark.parametrize("objective", [[], ["--objective", "clip"]])
def test_pacl_flags_without_the_pacl_objective_are_refused_not_dropped(synthetic, tmp_path, capsys, objective):
    """A CLIP run given --pacl-pool-temperature used to drop it without a word (before: exit 0); without
    --objective the CLIP's own (clip) is the one it is checked against."""
    assert _train(synthetic, "tiny", tmp_path / "run", "--pacl-pool-temperature", "0.5", *objective) == 2
    assert "--pacl-pool-temperature is for --objective pacl, not clip" in _one_line_error(capsys)


def test_augmenting_cached_features_is_refused_not_dropped():
    """The cache encodes each image once with the eval transform: --augment used to be dropped without a word."""
    with pytest.raises(ConfigError, match="--augment does not apply to --cache-features"):
        TrainConfig(data="d", model="m", out="o", objective="pacl", cache_features=True, augment=True)


def test_the_pacl_defaults_live_in_pacl_config_only():
    assert not any(name.startswith("pacl_") for name in train_defaults())
    config = TrainConfig(data="d", model="m", out="o")
    assert config.pacl == {} and config.objective is None
    legacy = TrainConfig.from_dict({"data": "d", "model": "m", "out": "o", "objective": "pacl",
                                    "pacl_pool_temperature": 0.5, "pacl_patch_tokens": "tokens"})
    assert legacy.pacl == {"pool_temperature": 0.5, "patch_tokens": "tokens"}
    assert TrainConfig.from_dict(legacy.to_dict()) == legacy
    with pytest.raises(ConfigError, match='"pacl" must be an object'):
        TrainConfig.from_dict({"data": "d", "model": "m", "out": "o", "pacl": 0.05})
    with pytest.raises(ConfigError, match="unknown PACL option"):
        TrainConfig(data="d", model="m", out="o", pacl={"pool_temprature": 0.5})
    with pytest.raises(ConfigError, match="pool_temperature must be a positive"):
        TrainConfig(data="d", model="m", out="o", pacl={"pool_temperature": 0.0})


def test_the_help_shows_pacl_configs_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    defaults = PACLConfig()
    assert f"(default: {defaults.pool_temperature})" in help_text and f"(default: {defaults.patch_tokens})" in help_text
