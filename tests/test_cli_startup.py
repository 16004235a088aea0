"""`clip-pacl --help`, `clip-pacl CMD --help` and argument errors answer at once: building the parser imports no
torch (nor numpy, PIL, ...); every command imports what it needs when it runs (issue 19, item 12).

Asserted on the modules imported, not on time: `python -X importtime -m clip_pacl_app.cli.main --help` shows where
the time goes when this fails.
"""

import importlib
import json
import subprocess
import sys

import pytest

# Imported by none of --help, CMD --help or an argument error. Each takes 0.1-5 s to import.
HEAVY = ("torch", "numpy", "PIL", "safetensors", "tokenizers", "transformers", "open_clip", "faiss", "matplotlib",
         "fastapi", "uvicorn", "onnx", "sklearn", "tqdm", "huggingface_hub", "timm", "webdataset")

PROBE = r"""
import contextlib, io, json, sys
from clip_pacl_app.cli.main import _command_modules, main

codes = {}
def call(argv):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    codes[" ".join(argv)] = [code, len(out.getvalue()) + len(err.getvalue())]

call(["--help"])
for mod in _command_modules():
    words = mod.COMMAND.split()
    call([*words, "--help"])
    call([*words, "--no-such-flag"])
    if len(words) == 2:
        call(words[:1])  # a group without its subcommand prints the group's help
print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
"""


@pytest.fixture(scope="module")
def probe():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_help_and_argument_errors_import_no_heavy_library(probe):
    loaded = {name.partition(".")[0] for name in probe["modules"]}
    assert not loaded & set(HEAVY), f"building the parser imported {sorted(loaded & set(HEAVY))}"


def test_every_command_answered(probe):
    codes = probe["codes"]
    assert len(codes) > 40  # --help, and per command: --help and a bad flag (and each group alone)
    for argv, (code, printed) in codes.items():
        assert printed > 0, argv
        expected = 0 if argv.endswith("--help") else 2
        assert code == expected, (argv, code)


def test_the_real_command_starts_without_torch():
    """The installed entry point, as a user runs it (`python -m clip_pacl_app.cli.main` is what `clip-pacl` runs)."""
    code = "import runpy, sys; sys.argv = ['clip-pacl', 'segment', '--help']\ntry:\n" \
           "    runpy.run_module('clip_pacl_app.cli.main', run_name='__main__')\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules, file=sys.stderr)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--background" in done.stdout and done.stderr.strip().splitlines()[-1] == "False", done.stderr


# clip_pacl_app/cli/defaults.py copies these so that the parsers need no torch; each copy must equal its original.
COPIES = {
    "AUTO_MIN_VECTORS": "clip_pacl.retrieval.ann",
    "AUTO_RERANK": "clip_pacl.retrieval.ann",
    "CALIBRATION_IMAGES": "clip_pacl.segmentation.calibrate",
    "DATA_FORMATS": "clip_pacl.data.formats",
    "DEFAULT_CS": "clip_pacl.eval.linear_probe",
    "DEFAULT_OPSET": "clip_pacl.formats.onnx",
    "DEFAULT_TEMPLATES": "clip_pacl.segmentation.predict",
    "METHODS": "clip_pacl.segmentation.predict",
    "NO_CLASS": "clip_pacl.segmentation.predict",
    "W": "clip_pacl.metrics",
}


@pytest.mark.parametrize("name", sorted(COPIES))
def test_cli_copies_of_library_constants_are_equal(name):
    from clip_pacl_app.cli import defaults

    original = getattr(importlib.import_module(COPIES[name]), name)
    assert getattr(defaults, name) == original


def test_cli_objectives_are_the_registry():
    from clip_pacl.losses import OBJECTIVES
    from clip_pacl_app.cli import defaults

    assert tuple(sorted(OBJECTIVES)) == defaults.OBJECTIVES


def test_every_copy_is_checked():
    from clip_pacl_app.cli import defaults

    copied = {name for name in vars(defaults) if name.isupper()}
    assert copied == set(COPIES) | {"OBJECTIVES"}


def test_the_package_still_offers_its_api_lazily():
    import clip_pacl

    for name in clip_pacl.__all__:
        assert callable(getattr(clip_pacl, name)), name
    assert clip_pacl.checkpoint.load is clip_pacl.load  # a submodule as an attribute
    with pytest.raises(AttributeError):
        clip_pacl.no_such_name  # noqa: B018
