"""Random weights are explicit: a bare preset in an inference command refuses in one line, `--random-weights` or
named pretrained weights (`ViT-B-32:openai`, `--pretrained openai`) decide; the library warns as open_clip does."""

import json
import warnings

import pytest

import clip_pacl
from clip_pacl.checkpoint import export_open_clip, hub
from clip_pacl.checkpoint.io import RandomWeightsError, RandomWeightsWarning
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl_app.cli.main import main
from test_hub import REVISION, cache_repo, directory_files, offline_cache  # noqa: F401 (a fixture)

REFUSAL = ("error: 'tiny' is a preset name: its weights would be random; name its weights "
           "({flag} MODEL:TAG{pretrained}, e.g. ViT-B-32:openai) or pass --random-weights")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("random_weights")
    generate_synthetic(root, 4, seed=0, image_size=64)
    return root


def commands(data, tmp):
    image = str(data / "images" / "000000.png")
    return {
        "zeroshot": ["zeroshot", "--model", "tiny", image, "--classes", "a,b"],
        "segment": ["segment", "--model", "tiny", image, "--classes", "a,b", "--out", f"{tmp}/m.png"],
        "eval zeroshot": ["eval", "zeroshot", "--model", "tiny", "--data", str(data / "colors.csv")],
        "eval retrieval": ["eval", "retrieval", "--model", "tiny", "--data", str(data / "captions.csv")],
        "eval segmentation": ["eval", "segmentation", "--model", "tiny", "--data", str(data / "segmentation")],
        "eval linear-probe": ["eval", "linear-probe", "--model", "tiny", "--train", str(data / "colors.csv"),
                              "--test", str(data / "colors.csv")],
        "score": ["score", "--model", "tiny", "--data", str(data / "captions.csv")],
        "index build": ["index", "build", "--model", "tiny", "--images", str(data / "images"), "--out", f"{tmp}/i"],
        "serve": ["serve", "--model", "tiny", "--port", "0"],
        "export onnx": ["export", "onnx", "--model", "tiny", "--out", f"{tmp}/onnx"],
        "convert": ["convert", "tiny", "--to", "clip_pacl", "--out", f"{tmp}/c"],
        "info": ["info", "tiny"],
        "merge": ["merge", "tiny", "tiny", "--out", f"{tmp}/merged"],
    }


@pytest.mark.parametrize("name", ["zeroshot", "segment", "eval zeroshot", "eval retrieval", "eval segmentation",
                                  "eval linear-probe", "score", "index build", "serve", "export onnx", "convert",
                                  "info", "merge"])
def test_a_bare_preset_refuses_in_one_line(name, data, tmp_path, capsys):
    argv = commands(data, tmp_path)[name]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    flag = {"convert": "SRC", "info": "SRC", "merge": "BASE"}.get(name, "--model")
    pretrained = "" if name == "merge" else " or --pretrained TAG|FILE"
    assert out == "" and err.strip() == REFUSAL.format(flag=flag, pretrained=pretrained)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("name", ["zeroshot", "score", "convert"])
def test_random_weights_asked_for_run(name, data, tmp_path):
    assert main([*commands(data, tmp_path)[name], "--random-weights"]) == 0


def test_info_says_the_weights_are_random(capsys):
    assert main(["info", "tiny", "--random-weights"]) == 0
    assert "weights:    random init (no pretrained weights)" in capsys.readouterr().out.splitlines()
    assert main(["info", "tiny", "--random-weights", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "random init (no pretrained weights)"


@pytest.fixture()
def tiny_openai(offline_cache, tmp_path, monkeypatch):  # noqa: F811 (the fixture imported above)
    """`tiny` + tag `openai` names a cached hub repo, as ViT-B-32 + openai names timm/vit_base_patch32_clip_224..."""
    ours = clip_pacl.load("tiny-quickgelu", random_weights=True)
    export_open_clip(ours, tmp_path / "repo")
    cache_repo(offline_cache, "acme/tiny_clip.openai", directory_files(tmp_path / "repo"))
    monkeypatch.setitem(hub.OPENAI_REPOS, "tiny", "acme/tiny_clip.openai")
    return ours


@pytest.mark.parametrize("spelling", [["tiny:openai"], ["tiny", "--pretrained", "openai"]])
def test_pretrained_weights_named_as_users_write_them(tiny_openai, spelling, data, tmp_path, capsys):
    assert main(["info", *spelling, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights"] == "loaded" and info["source"]["hub_id"] == "acme/tiny_clip.openai"
    argv = ["zeroshot", "--model", *spelling, str(data / "images" / "000000.png"), "--classes", "a,b", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["predictions"][0]["label"] in ("a", "b")
    # an index records the weights so that search loads them again (not a random preset)
    assert main(["index", "build", "--model", *spelling, "--images", str(data / "images"), "--out",
                 str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["model"] == "tiny:openai"
    assert main(["search", str(tmp_path / "idx"), "a red circle", "-k", "1", "--json"]) == 0


def test_pretrained_names_a_presets_weights_only(tmp_path, capsys):
    clip_pacl.save(clip_pacl.load("tiny", random_weights=True), tmp_path / "ckpt")
    assert main(["info", str(tmp_path / "ckpt"), "--pretrained", "openai"]) == 2
    assert "--pretrained names the weights of a preset" in capsys.readouterr().err


def test_the_library_warns_like_open_clip():
    with pytest.warns(RandomWeightsWarning, match="'tiny' is a preset name: no pretrained weights loaded"):
        clip_pacl.load("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_pacl.load("tiny", random_weights=True)  # asked for: silent
    with pytest.raises(RandomWeightsError, match="weights would be random"):
        clip_pacl.load("tiny", random_weights=False)


def test_training_from_a_preset_stays_allowed(data, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        assert main(["train", "--data", str(data / "captions.csv"), "--model", "tiny", "--out", str(tmp_path / "r"),
                     "--steps", "1", "--batch-size", "4", "--no-progress"]) == 0
