"""A training run directory is a model source: its final/ model, or its newest complete checkpoint while training."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import clip_pacl
from clip_pacl.checkpoint.rundir import resolve_run_dir
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import CheckpointError
from clip_pacl_app.cli.main import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real tiny training run (2 steps, a checkpoint after each) on the synthetic data."""
    data = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(data, 16, seed=0, image_size=64, max_objects=1)
    out = tmp_path_factory.mktemp("runs") / "clip"
    code = main(["train", "--data", str(data / "captions.csv"), "--out", str(out), "--model", "tiny", "--steps", "2",
                 "--batch-size", "8", "--save-every", "1", "--keep", "2", "--no-progress", "--device", "cpu"])
    assert code == 0
    return out


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_run_dir_loads_its_final_model_and_says_so(run, capsys):
    model = clip_pacl.load(run)
    assert "final" in capsys.readouterr().err
    assert _same_weights(model, clip_pacl.load(run / "final"))
    assert not _same_weights(model, clip_pacl.load(run / "checkpoints" / "step_00000001"))


def test_run_still_training_uses_its_newest_complete_checkpoint(run, tmp_path, capsys):
    live = tmp_path / "live"
    shutil.copytree(run, live, ignore=shutil.ignore_patterns("final"))
    half_written = live / "checkpoints" / "step_00000003"  # no DONE yet: a save in progress
    shutil.copytree(live / "checkpoints" / "step_00000001", half_written)
    (half_written / "DONE").unlink()
    assert Path(resolve_run_dir(live)) == live / "checkpoints" / "step_00000002"
    assert "step_00000002" in capsys.readouterr().err
    assert _same_weights(clip_pacl.load(live), clip_pacl.load(run / "checkpoints" / "step_00000002"))


def test_other_sources_pass_through_and_an_empty_run_is_one_clear_error(run, tmp_path):
    for src in ("tiny", str(run / "final"), run / "final", tmp_path):
        assert resolve_run_dir(src) is src
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="training run with no final/ and no complete checkpoint"):
        clip_pacl.load(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        clip_pacl.load(tmp_path)


def test_cli_commands_accept_a_run_dir(run, tmp_path, capsys):
    data = tmp_path / "data"
    generate_synthetic(data, 6, seed=1, image_size=64, max_objects=1)
    assert main(["eval", "zeroshot", "--model", str(run), "--data", str(data / "colors.csv"), "--templates",
                 "simple", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_images"] > 0 and f"using {run / 'final'}" in captured.err
