"""Checkpoints and resume: a run killed at any moment continues where it was and ends as the same run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clip_pacl
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.train import checkpointing
from clip_pacl_app.cli.main import main

STEPS = 8


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, 24, seed=0, image_size=64)
    return out / "captions.csv"


def _args(data: Path, out: Path, steps: int = STEPS) -> list[str]:
    # 24 images / batch 8 = 3 steps per epoch, so resuming crosses epochs and lands mid-epoch.
    return ["train", "--data", str(data), "--out", str(out), "--model", "tiny", "--steps", str(steps),
            "--batch-size", "8", "--lr", "1e-3", "--warmup", "2", "--save-every", "2", "--log-every", "1",
            "--no-progress"]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = ("import sys, torch; torch.set_num_threads(1); from clip_pacl_app.cli.main import main; "
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"training exited early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = clip_pacl.load(a).state_dict(), clip_pacl.load(b).state_dict()
    for name in sa:
        assert torch.allclose(sa[name], sb[name], atol=1e-6), name


@pytest.fixture(scope="module")
def uninterrupted(synthetic, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    torch.set_num_threads(1)  # the same thread count as the subprocesses, for bitwise-equal CPU kernels
    try:
        assert main(_args(synthetic, out)) == 0
    finally:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    return out


@pytest.mark.timeout(300)
def test_sigkill_then_resume_auto_is_the_same_run(synthetic, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = _start(_args(synthetic, out))
    _wait_for(lambda: checkpointing.latest_checkpoint(out) is not None, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    killed_at = int(checkpointing.latest_checkpoint(out).name.split("_")[1])
    assert killed_at < STEPS
    resumed = _start([*_args(synthetic, out), "--resume", "auto"])
    assert resumed.wait(240) == 0, resumed.stderr.read()
    assert "resuming from" in resumed.stderr.read()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, lines after the checkpoint replaced
    assert checkpointing.load_train_state(checkpointing.latest_checkpoint(out))["step"] == STEPS
    _same_weights(out / "final", uninterrupted / "final")


@pytest.mark.timeout(300)
def test_sigint_saves_a_checkpoint_and_exits_130(synthetic, tmp_path):
    out = tmp_path / "run"
    proc = _start(_args(synthetic, out, steps=10_000))
    _wait_for(lambda: (out / "metrics.jsonl").is_file(), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130
    err = proc.stderr.read()
    assert "continue with --resume auto" in err and "Traceback" not in err
    ckpt = checkpointing.latest_checkpoint(out)
    assert ckpt is not None and checkpointing.is_complete(ckpt)
    state = checkpointing.load_train_state(ckpt)
    assert state["step"] >= 1 and int(ckpt.name.split("_")[1]) == state["step"]
    clip_pacl.load(ckpt)


def test_resume_ignores_incomplete_checkpoints(synthetic, uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    newest = checkpointing.latest_checkpoint(out)
    half = out / "checkpoints" / "step_00000099"  # killed before DONE was written
    shutil.copytree(newest, half)
    (half / "DONE").unlink()
    tmp = out / "checkpoints" / f".tmp-step_00000100-{os.getpid()}"  # killed mid-save
    shutil.copytree(newest, tmp)
    assert checkpointing.resolve_resume("auto", out) == newest
    checkpointing.remove_stale_temporaries(out)
    assert not tmp.exists() and half.exists()


def test_resume_from_a_finished_run_does_no_more_steps(synthetic, uninterrupted, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    assert main([*_args(synthetic, out), "--resume", "auto", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == STEPS
    _same_weights(out / "final", uninterrupted / "final")


def test_resume_refuses_a_different_global_batch(synthetic, uninterrupted, tmp_path, capsys):
    args = _args(synthetic, tmp_path / "run")
    args[args.index("--batch-size") + 1] = "4"
    assert main([*args, "--resume", str(uninterrupted)]) == 2
    assert "global batch" in capsys.readouterr().err


def test_resume_from_a_missing_checkpoint_is_an_error(synthetic, tmp_path, capsys):
    assert main([*_args(synthetic, tmp_path / "run"), "--resume", str(tmp_path / "nothing")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_train_state_loads_with_weights_only(uninterrupted):
    path = checkpointing.latest_checkpoint(uninterrupted) / checkpointing.TRAIN_STATE
    state = torch.load(path, weights_only=True)
    assert {"optimizer", "schedule", "scaler", "rng", "step", "epoch", "batch_in_epoch"} <= set(state)


def test_a_new_run_refuses_to_overwrite_an_existing_one(synthetic, uninterrupted, capsys):
    assert main(_args(synthetic, uninterrupted)) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["--seed", "--data", "--objective"])
def test_resume_refuses_changed_data_seed_or_objective(synthetic, uninterrupted, tmp_path, capsys, change):
    args = _args(synthetic, tmp_path / "run")
    if change == "--data":
        moved = tmp_path / "copy" / "captions.csv"
        moved.parent.mkdir()
        moved.write_text(synthetic.read_text())  # the same rows from another file: another run's data
        (moved.parent / "images").symlink_to(synthetic.parent / "images")  # (images are checked before resuming)
        args[args.index("--data") + 1] = str(moved)
    else:
        args += [change, {"--seed": "1", "--objective": "siglip"}[change]]
    assert main([*args, "--resume", str(uninterrupted)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume: the checkpoint was trained with ") and len(err.splitlines()) == 1
    assert change.lstrip("-") in err


@pytest.mark.timeout(300)
def test_a_failed_checkpoint_write_keeps_the_last_complete_one(synthetic, uninterrupted, tmp_path, monkeypatch,
                                                               one_thread):
    """Step 4's checkpoint write dies half way (--keep 1): step 2's stays complete, the half-written one is removed,
    and resume finishes the run."""
    from clip_pacl.train import TrainConfig, train

    real_save, saves = torch.save, []

    def dies_on_second_checkpoint(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise OSError("killed while writing")
        return real_save(obj, path, *args, **kwargs)

    out = tmp_path / "run"
    config = TrainConfig(data=str(synthetic), out=str(out), model="tiny", steps=STEPS, batch_size=8, lr=1e-3, warmup=2,
                         save_every=2, log_every=1, progress=False, keep=1)  # = _args(...) + --keep 1
    monkeypatch.setattr(checkpointing.torch, "save", dies_on_second_checkpoint)
    with pytest.raises(OSError, match="killed while writing"):
        train(config)
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    kept = checkpointing.latest_checkpoint(out)
    assert kept is not None and kept.name == "step_00000002" and checkpointing.is_complete(kept)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]  # no temporary left
    clip_pacl.load(kept)
    assert main([*_args(synthetic, out), "--keep", "1", "--resume", "auto"]) == 0
    _same_weights(out / "final", uninterrupted / "final")


def test_a_kill_while_replacing_a_checkpoint_of_the_same_step_keeps_it(tmp_path, monkeypatch):
    """Saving step N again sets the old step N aside, then renames the new one in; killed in between, the next
    start puts the old one back (it used to be deleted first, leaving no step N at all)."""
    model = clip_pacl.load("tiny")
    first = checkpointing.save_checkpoint(tmp_path, 4, model, {"step": 4, "which": 1}, keep=2)
    real_replace = os.replace

    def killed_before_the_new_one_lands(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", killed_before_the_new_one_lands)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(tmp_path, 4, model, {"step": 4, "which": 2}, keep=2)
    monkeypatch.setattr(checkpointing.os, "replace", real_replace)
    checkpointing.remove_stale_temporaries(tmp_path)
    assert checkpointing.latest_checkpoint(tmp_path) == first and checkpointing.is_complete(first)
    assert checkpointing.load_train_state(first)["which"] == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]
