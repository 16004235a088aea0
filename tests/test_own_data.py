"""A user's own small CSV: the demo's printed training commands work on a few dozen pairs, image paths are checked
before training, loading runs in worker processes by default, the first loss is logged at step 1, one process
reports a torchrun job, and `eval linear-probe` says when the test images are training images."""

import json
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

import clip_pacl
import clip_pacl.data.dataset as dataset_module
from clip_pacl.data import build_loader
from clip_pacl.data.rows import CaptionRow
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.train import TrainConfig
from clip_pacl_app.cli.main import main
from clip_pacl_app.demo.pipeline import DemoConfig, clip_train_config, pacl_train_config
from clip_pacl_app.demo.report import next_steps

FAST = ["--model", "tiny", "--no-progress", "--log-every", "5"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A user's CSV of 12 photos in open_clip's column names (filepath,title), paths relative to the CSV."""
    root = tmp_path_factory.mktemp("own")
    generate_synthetic(root / "gen", 12, seed=0, image_size=64)
    (root / "photos").mkdir()
    lines = ["filepath,title"]
    for line in (root / "gen" / "captions.csv").read_text().splitlines()[1:]:
        image, caption = line.split(",", 1)
        Image.open(root / "gen" / image).convert("RGB").save(root / "photos" / (Path(image).stem + ".jpg"))
        lines.append(f"photos/{Path(image).stem}.jpg,{caption}")
    (root / "mine.csv").write_text("\n".join(lines) + "\n")
    return root / "mine.csv"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_demos_printed_commands_train_on_a_dozen_pairs(photos, tmp_path, capsys):
    """The full demo's commands (batch 128 and 256) on a 12-pair CSV in open_clip's column names: the batch shrinks
    to the data with a note, the fine-tune starts from the demo's CLIP at a smaller lr."""
    demo, cfg = tmp_path / "demo", DemoConfig(out=str(tmp_path / "demo"))
    demo.mkdir()
    seg = demo / "data" / "test" / "segmentation_colors" / "images"
    seg.mkdir(parents=True)
    (seg / "000000.png").touch()
    clip_config = clip_train_config(cfg, demo / "data" / "train", demo / "data" / "test", demo)
    torch.manual_seed(0)
    clip_pacl.save(clip_pacl.load(str(demo / "clip_model.json")), demo / "clip" / "final")  # the demo's CLIP
    steps = {s["what"].split(" ")[0]: shlex.split(s["command"])[1:]
             for s in next_steps(demo, demo / "data" / "test", clip_config, pacl_train_config(cfg, demo, demo))}
    finetune, scratch = steps["fine-tune"], steps["or"]
    assert finetune[finetune.index("--model") + 1] == str(demo / "clip")
    assert float(finetune[finetune.index("--lr") + 1]) == cfg.clip_lr / 10 and "--epochs" in finetune
    assert scratch[scratch.index("--batch-size") + 1] == "128"
    for name, argv in (("finetune", finetune), ("scratch", scratch)):
        argv = [str(photos) if a == "YOUR.csv" else a for a in argv]
        out = tmp_path / name
        length = [] if name == "finetune" else ["--steps", "2"]  # the fine-tune as printed: 10 epochs, 10 steps
        assert main([*argv, "--out", str(out), *length, "--no-progress"]) == 0, capsys.readouterr().err
        err = capsys.readouterr().err
        assert "12 training pairs, fewer than one step's 128" in err and "training with --batch-size 12" in err
        assert json.loads((out / "train_config.json").read_text())["batch_size"] == 12
    assert main(["train", "--data", str(photos), "--out", str(tmp_path / "accum"), *FAST, "--accum", "13"]) == 2
    assert "fewer than one step's" in capsys.readouterr().err


def test_image_paths_are_checked_before_training(photos, tmp_path, capsys):
    lines = photos.read_text().splitlines()
    some = tmp_path / "some.csv"
    some.write_text("\n".join([*lines, "photos/gone1.jpg,a lost photo", "photos/gone2.jpg,another"]) + "\n")
    (tmp_path / "photos").symlink_to(photos.parent / "photos")
    assert main(["train", "--data", str(some), "--out", str(tmp_path / "some"), *FAST, "--steps", "1",
                 "--batch-size", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_bad"] == 0  # skipped up front, not met as unreadable
    none = tmp_path / "none.csv"
    none.write_text("image,caption\nnowhere/a.jpg,a\nnowhere/b.jpg,b\n")
    assert main(["train", "--data", str(none), "--out", str(tmp_path / "none"), *FAST, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: none of the 2 images none.csv lists exists (e.g. ") and len(err.splitlines()) == 1
    assert not (tmp_path / "none" / "checkpoints").exists()


def test_missing_images_are_counted_once(tmp_path, caplog):
    present = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(present)
    rows = [CaptionRow(present, "x"), CaptionRow(present, "y"), CaptionRow(tmp_path / "b.png", "z")]
    assert dataset_module.existing_image_rows(rows, tmp_path / "data.csv") == rows[:2]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping 1 of 2 images data.csv lists (1 rows): the files do not exist (e.g. {tmp_path / 'b.png'})"]


def test_workers_default_to_the_cpus_less_one_and_an_epochs_batches(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert TrainConfig(data="d", model="m", out="o").workers == 4 == dataset_module.default_workers()
    monkeypatch.setattr(dataset_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert TrainConfig(data="d", model="m", out="o").workers == 1
    assert TrainConfig(data="d", model="m", out="o", workers=0).workers == 0
    monkeypatch.setattr(dataset_module.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert dataset_module.default_workers() == 0
    import multiprocessing

    monkeypatch.setattr(dataset_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)  # a pool's worker: no children
    assert dataset_module.default_workers() == 0
    monkeypatch.undo()
    data = list(range(10))
    assert build_loader(data, batch_size=4, shuffle=True, workers=4, seed=0, drop_last=True).num_workers == 3
    assert build_loader(data, batch_size=10, shuffle=True, workers=4, seed=0, drop_last=True).num_workers == 1


def test_a_run_with_workers_is_the_run_without(photos, tmp_path):
    """Worker processes on a tiny set (3 batches an epoch, into the second epoch): the same weights as loading in
    the main process (resuming with workers: test_data_loader.py)."""
    common = ["train", "--data", str(photos), *FAST, "--batch-size", "4", "--lr", "1e-3", "--warmup", "1",
              "--eps", "1e-6", "--steps", "4"]
    assert main([*common, "--out", str(tmp_path / "main"), "--workers", "0"]) == 0
    assert main([*common, "--out", str(tmp_path / "workers"), "--workers", "2"]) == 0
    a, b = (clip_pacl.load(tmp_path / run / "final").state_dict() for run in ("main", "workers"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_the_first_loss_is_logged_at_step_1(photos, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(photos), "--out", str(out), *FAST, "--steps", "11", "--batch-size", "4",
                 "--workers", "0"]) == 0
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 5, 10, 11]


def test_only_rank_0_prints_the_final_lines(photos, tmp_path, capsys, monkeypatch):
    """Every torchrun process runs `clip-pacl train`; the others stay quiet at the end (the run is faked: the
    real two-process run is in test_distributed.py)."""
    import clip_pacl.train as train_package

    result = train_package.TrainResult(steps=1, epoch=0, seconds=1.0, final_loss=0.5, val=None, checkpoint=None,
                                       final_model="F", run_dir="R", n_bad=0, n_seen=4)
    monkeypatch.setattr(train_package, "train", lambda config: result)
    argv = ["train", "--data", str(photos), "--out", str(tmp_path), "--model", "tiny"]
    for rank, printed in (("1", ""), ("0", "trained 1 steps in 1.0s, final loss 0.5000\nmodel: F\n")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(argv) == 0
        assert capsys.readouterr().err == printed
        assert main([*argv, "--json"]) == 0
        assert bool(capsys.readouterr().out) == (rank == "0")


def test_linear_probe_on_its_own_training_images_warns(tmp_path, capsys):
    generate_synthetic(tmp_path, 60, seed=0, image_size=32)
    table = tmp_path / "colors.csv"
    header, *rows = table.read_text().splitlines()
    args = ["eval", "linear-probe", "--model", "tiny", "--random-weights", "--train", str(table), "--c", "1"]
    assert main([*args, "--test", str(table), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["overlap"] == len(rows)
    assert f"\nWARNING: {len(rows)} of the {len(rows)} test images are also training images" in captured.err
    assert main([*args, "--test", str(table)]) == 0
    assert f"WARNING: {len(rows)} of the {len(rows)} test images" in capsys.readouterr().out  # beside the accuracy
    half = tmp_path / "half.csv"
    half.write_text("\n".join([header, *rows[len(rows) // 2:]]) + "\n")  # the same files, written another way
    half.write_text(half.read_text().replace("images/", "./images/../images/"))
    assert main([*args, "--test", str(half), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overlap"] == len(rows) - len(rows) // 2
    other = tmp_path / "other"
    generate_synthetic(other, 30, seed=1, image_size=32)
    assert main([*args, "--test", str(other / "colors.csv"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["overlap"] == 0 and "WARNING" not in captured.err
