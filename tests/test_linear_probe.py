"""Linear probe on frozen features (equal to sklearn by hand, above chance) and ImageFolder labelled data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

import clip_pacl
from clip_pacl.data import load_image, read_label_rows
from clip_pacl.data.imagefolder import read_class_folders, read_labelled
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import DataError
from clip_pacl.eval.linear_probe import DEFAULT_CS, evaluate_linear_probe
from clip_pacl.transforms import image_transform
from clip_pacl.zeroshot.evaluate import evaluate_zeroshot
from clip_pacl_app.cli.main import main


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return clip_pacl.load("tiny").eval()


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200), "grey": (128, 128, 128)}


def _write_colour_table(folder: Path, per_class: int, seed: int) -> Path:
    """A table of noisy single-colour images (a random model's features separate colours, not the synthetic
    set's small shapes on textured backgrounds), plus one row of another class for `skipped_rows`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lines = ["image,label"]
    for name, rgb in COLOURS.items():
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) * rng.uniform(0.7, 1.2) + rng.normal(0, 25, (48, 48, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}{i}.png")
            lines.append(f"{name}{i}.png,{name}")
    return _write(folder / "labels.csv", lines)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(train table, test table); the test table has 2 extra rows of a class no training image has."""
    root = tmp_path_factory.mktemp("probe")
    train = _write_colour_table(root / "train", 12, seed=0)
    test = _write_colour_table(root / "test", 6, seed=1)
    generate_synthetic(root / "other", 2, seed=0, image_size=48)
    extra = [f"{p},unseen" for p in sorted((root / "other" / "images").iterdir())]
    _write(test, [*test.read_text().splitlines(), *extra])
    return train, test


def _features(model, rows) -> np.ndarray:
    transform = image_transform(model.image_size)
    with torch.no_grad():
        return model.encode_image(torch.stack([transform(load_image(r.image)) for r in rows]), normalize=True).numpy()


def test_probe_equals_sklearn_by_hand_and_beats_chance(tiny, data):
    train_rows, test_rows = read_label_rows(data[0]), read_label_rows(data[1])
    result = evaluate_linear_probe(tiny, train_rows, test_rows, progress=False)

    names = sorted({r.label for r in train_rows})
    train_y = np.array([names.index(r.label) for r in train_rows])
    train_x = _features(tiny, train_rows)
    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.2, random_state=0, stratify=train_y)
    val = {c: (LogisticRegression(C=c, max_iter=1000).fit(fit_x, fit_y).predict(val_x) == val_y).mean()
           for c in DEFAULT_CS}
    best = min(c for c in DEFAULT_CS if val[c] == max(val.values()))
    probe = LogisticRegression(C=best, max_iter=1000).fit(train_x, train_y)
    known = [r for r in test_rows if r.label in names]
    predicted = probe.predict(_features(tiny, known))
    top1 = float((predicted == np.array([names.index(r.label) for r in known])).mean())
    print(f"linear probe top-1 {result['top1']:.4f} (by hand {top1:.4f}), C = {result['C']:g}, "
          f"{len(names)} classes, chance {1 / len(names):.4f}")
    assert result["C"] == best and result["top1"] == pytest.approx(top1)
    assert result["num_images"] == len(known) and result["skipped_rows"] == len(test_rows) - len(known)
    assert result["skipped_rows"] == 2 and result["top1"] > 2.5 / len(names)  # well above chance
    per_class = {n: float((predicted[[i for i, r in enumerate(known) if r.label == n]] == names.index(n)).mean())
                 for n in {r.label for r in known}}
    assert result["per_class_recall"] == pytest.approx(per_class)


def _class_tree(csv_path: Path, out: Path) -> Path:
    """The rows of an image,label table copied into out/<label>/<image>."""
    for row in read_label_rows(csv_path):
        (out / row.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(row.image, out / row.label / row.image.name)
    return out


def test_image_folder_reader(tmp_path, data):
    tree = _class_tree(data[1], tmp_path / "tree")
    (tree / "red" / "notes.txt").write_text("not an image")  # ignored by extension
    rows = read_class_folders(tree)
    assert {r.label for r in rows} == {p.name for p in tree.iterdir()}
    assert len(rows) == len(read_label_rows(data[1])) and all(r.image.parent.name == r.label for r in rows)
    assert read_labelled(tree) == rows and read_labelled(data[1]) == read_label_rows(data[1])
    with pytest.raises(DataError, match="no class folders"):
        read_class_folders(tree / "red")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="hold no images"):
        read_class_folders(tmp_path / "empty")


def test_unreadable_images_in_a_folder_are_counted_and_skipped(tiny, tmp_path, data):
    tree = _class_tree(data[1], tmp_path / "tree")
    (tree / "red" / "broken.png").write_bytes(b"\x89PNG truncated")
    rows = read_class_folders(tree)
    result = evaluate_zeroshot(tiny, rows, ["a {} shape"], progress=False)
    assert result["num_unreadable"] == 1 and result["num_images"] == len(rows) - 1
    assert result["unreadable"][0]["path"].endswith("broken.png")


def test_cli_linear_probe_on_folders_and_tables(tmp_path, data, capsys):
    train_tree = _class_tree(data[0], tmp_path / "train")
    (train_tree / "red" / "broken.png").write_bytes(b"")
    args = ["eval", "linear-probe", "--model", "tiny", "--random-weights",
            "--train", str(train_tree), "--test", str(data[1]),
            "--c", "0.1", "1", "10"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["C"] in (0.1, 1.0, 10.0) and set(result["val_accuracy"]) == {"0.1", "1", "10"}
    assert result["num_unreadable"] == 1 and 0 < result["top1"] <= 1
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "per-class recall" in out and "1 unreadable images skipped" in out


def test_cli_errors_are_one_line(tmp_path, data, capsys):
    other = tmp_path / "other.csv"
    other.write_text("image,label\n" + "\n".join(f"{r.image},mauve" for r in read_label_rows(data[1])) + "\n")
    for extra, message in ((["--test", str(other)], "no test image has a label among"),
                           (["--test", str(data[1]), "--val-fraction", "1.5"], "validation fraction")):
        assert main(["eval", "linear-probe", "--model", "tiny", "--random-weights",
                     "--train", str(data[0]), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err


def test_zeroshot_command_takes_a_folder_of_images(data, tmp_path, capsys):
    folder = data[0].parent
    expected = sorted(str(p) for p in folder.glob("*.png"))
    assert main(["zeroshot", "--model", "tiny", "--random-weights",
                 str(folder), "--classes", "red,green", "--json"]) == 0
    assert [r["image"] for r in json.loads(capsys.readouterr().out)["results"]] == expected
    (tmp_path / "empty").mkdir()
    assert main(["zeroshot", "--model", "tiny", "--random-weights",
                 str(tmp_path / "empty"), "--classes", "red,green"]) == 2
    assert capsys.readouterr().err.strip() == "error: the folders given hold no images"
