"""Loading a file never runs code from it.

OpenAI's TorchScript `.pt` files are read by a restricted unpickler (`formats/torchscript.py`) and give the
same model as open_clip's `load_openai_model`, which runs `torch.jit.load`; ours never calls it. Malicious
files (a pickle's `__reduce__`, a TorchScript `__setstate__`, a TorchScript archive whose pickle names
`os.system`) under every extension, in checkpoint directories and in a hub cache, run nothing and give one
error line, from the library and from the CLI. A control test shows each payload does run under a naive loader,
so the "nothing ran" checks can fail. A backbone's config.json cannot make timm read other files, and a model
loads and encodes inside `torch.inference_mode()`.
"""

import copyreg
import io
import json
import os
import pickle
import shlex
import subprocess
import sys
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch

import clip_pacl
from clip_pacl.checkpoint import load_with_source
from clip_pacl.errors import CheckpointError
from clip_pacl.formats import torchscript
from clip_pacl.tokenizer import tokenize
from clip_pacl_app.cli.main import main as cli_main
from helpers import randomize_ as randomize_all_
from helpers import require
from test_hub import cache_repo
from test_hub import offline_cache as offline_cache  # a fixture: an empty HF cache, offline

TOL = 1e-5
# OpenAI-architecture models small enough to trace in seconds; widths are multiples of 64 because open_clip's
# `build_model_from_openai_state_dict` infers 64-wide heads, as OpenAI's models have.
OPENAI_ARCHS = {
    "vit": {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}},
    "rn": {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}},
}
EXTENSIONS = (".pt", ".bin", ".safetensors", ".pth", "")


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """The shared randomiser (every float tensor off its initial value), then rounded to fp16-representable values,
    as in OpenAI's files (open_clip's loader passes them through fp16)."""
    randomize_all_(module, seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def save_like_openai(model: torch.nn.Module, path, image_size: int) -> None:
    """A traced CLIP in the layout of OpenAI's released files: tensors `input_resolution`, `context_length`,
    `vocab_size` among the buffers, the causal mask a constant of the trace rather than a buffer."""
    for key, value in {"input_resolution": image_size, "context_length": 77, "vocab_size": 49408}.items():
        model.__dict__.pop(key, None)  # open_clip keeps these as Python attributes; OpenAI's are tensors
        model.register_buffer(key, torch.tensor(value))
    object.__setattr__(model, "attn_mask", model._buffers.pop("attn_mask"))
    images = torch.ones(2, 3, image_size, image_size)
    texts = torch.zeros(2, 77, dtype=torch.int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (images, texts), check_trace=False).save(str(path))


@pytest.fixture(scope="module", params=sorted(OPENAI_ARCHS))
def openai_archive(request, tmp_path_factory):
    """(path of a randomised OpenAI-style TorchScript file, its image size)."""
    open_clip = require("open_clip")
    cfg = OPENAI_ARCHS[request.param]
    out = tmp_path_factory.mktemp(f"openai_{request.param}")
    name = f"openai-{request.param}-test"
    (out / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(out / f"{name}.json")
    model = open_clip.create_model(name, force_quick_gelu=True).eval()
    randomize_(model, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tracing small models: one thread is fastest on a busy machine
    save_like_openai(model, out / f"{name}.pt", cfg["vision_cfg"]["image_size"])
    torch.set_num_threads(threads)
    return out / f"{name}.pt", cfg["vision_cfg"]["image_size"]


def _jit_state(path) -> dict:
    """The reference: what TorchScript itself loads (run here only, on our own file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path)).state_dict()


def _refuse_jit_load(*args, **kwargs):
    pytest.fail("torch.jit.load was called")


def test_torchscript_reader_gives_torchscripts_state_dict(openai_archive, monkeypatch):
    path, _ = openai_archive
    reference = _jit_state(path)
    monkeypatch.setattr(torch.jit, "load", _refuse_jit_load)
    ours = torchscript.read_state(path)
    assert list(ours) == list(reference)
    assert all(ours[k].dtype == reference[k].dtype and torch.equal(ours[k], reference[k]) for k in reference)
    floats = [v for v in reference.values() if v.is_floating_point() and v.numel() > 1]
    assert all(not torch.all(v == v.flatten()[0]) for v in floats)  # every float tensor was randomised


def test_openai_archive_matches_open_clips_loader(openai_archive, monkeypatch):
    open_clip = require("open_clip")
    path, image_size = openai_archive
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # open_clip's loader calls the deprecated torch.jit.load
        reference = open_clip.load_openai_model(str(path), precision="fp32", device="cpu").eval()
    monkeypatch.setattr(torch.jit, "load", _refuse_jit_load)
    model, source = load_with_source(path)
    assert source.format == "openai_torchscript"
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    texts = tokenize(["a photo of a cat", "two dogs playing in the long grass near a river"])
    with torch.no_grad():
        assert (model.eval().encode_image(images) - reference.encode_image(images)).abs().max() < TOL
        assert (model.encode_text(texts) - reference.encode_text(texts)).abs().max() < TOL
    assert torch.equal(model.logit_scale, reference.logit_scale)


class _Module:
    """Pickles as TorchScript pickles a module: `__torch__.Module` built empty, then given its attributes."""

    def __init__(self, **attributes):
        self.attributes = attributes

    def __reduce__(self):
        return copyreg.__newobj__, (_Module,), self.attributes


class _Tensor:
    """Pickles as `torch._utils._rebuild_tensor_v2` of storage "0" (two floats) with this view."""

    def __init__(self, offset: int, size: tuple, stride: tuple):
        self.view = offset, size, stride

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_STORAGE, *self.view, False, OrderedDict())


_STORAGE = object()


class _ArchivePickler(pickle.Pickler):
    def __init__(self, file, numel: int):
        super().__init__(file, protocol=2)
        self.numel = numel

    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", self.numel) if obj is _STORAGE else None


def _hand_made_archive(path, root, data: bytes | None = b"\0" * 8, numel: int = 2) -> None:
    """A TorchScript-layout zip holding `root` as its module pickle and `data` as storage "0" (`numel` floats)."""
    pickled = io.BytesIO()
    with pytest.MonkeyPatch.context() as patch:  # `_Module` pickles under the name TorchScript gives its classes
        patch.setattr(_Module, "__module__", "__torch__")
        patch.setitem(sys.modules, "__torch__", type(sys)("__torch__"))
        patch.setattr(sys.modules["__torch__"], "_Module", _Module, raising=False)
        _ArchivePickler(pickled, numel).dump(root)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data.pkl", pickled.getvalue())
        archive.writestr("m/constants.pkl", pickle.dumps(()))
        if data is not None:
            archive.writestr("m/data/0", data)


def test_hand_made_archive_reads_back(tmp_path):
    """The control for the refusals below: the same construction with sound values is read."""
    _hand_made_archive(tmp_path / "ok.pt", _Module(inner=_Module(weight=_Tensor(1, (1,), (1,))), training=True),
                       torch.tensor([1.0, 2.0]).numpy().tobytes())
    assert torchscript.read_state(tmp_path / "ok.pt") == {"inner.weight": torch.tensor([2.0])}


@pytest.mark.parametrize(("root", "data", "error"), [
    (_Module(weight=_Tensor(0, (3,), (1,))), b"\0" * 8, "a tensor does not fit its storage"),
    (_Module(weight=_Tensor(1, (2,), (1,))), b"\0" * 8, "a tensor does not fit its storage"),
    (_Module(weight=_Tensor(0, (2,), (1,))), b"\0" * 4, "m/data/0 holds 4 bytes, not the 8 its tensors need"),
    (_Module(weight=_Tensor(0, (2,), (1,))), None, "it lacks the tensor data m/data/0"),
    ({"weight": _Tensor(0, (2,), (1,))}, b"\0" * 8, "its root is a dict, not a TorchScript module"),
    (_Module(training=True), b"", "its module holds no tensors"),
])
def test_torchscript_reader_refuses_unsound_archives(root, data, error, tmp_path):
    _hand_made_archive(tmp_path / "odd.pt", root, data)
    with pytest.raises(CheckpointError) as info:
        clip_pacl.load(tmp_path / "odd.pt")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'odd.pt'} is a TorchScript archive clip-pacl does not read: {error}")
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------- malicious files
class _Exploit:
    """Unpickled without restrictions, this runs a shell command that creates `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class _SetstateExploit(torch.nn.Module):
    """A TorchScript module whose `__setstate__` (run by `torch.jit.load`) creates the file at `marker`."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return self.marker, self.weight, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.marker, self.training = state[0], state[2]
        # from_file(shared=True) creates the file; using the result keeps TorchScript from dropping the call
        self.weight = state[1] + torch.from_file(self.marker, True, 2).sum()


def _with_data_pkl(archive: bytes, data_pkl: bytes) -> bytes:
    """`archive` (a torch.save or TorchScript zip) with its `data.pkl` replaced."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


def malicious_payloads(marker) -> dict[str, bytes]:
    """Files that run code (creating `marker`) when read by a loader that trusts them."""
    state = {"visual.conv1.weight": _Exploit(str(marker))}
    raw_pickle = pickle.dumps(state, protocol=2)
    torch_zip = io.BytesIO()
    torch.save({"state_dict": state}, torch_zip)
    setstate = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, and still what OpenAI shipped
        torch.jit.save(torch.jit.script(_SetstateExploit(str(marker))), setstate)
    return {"pickle": raw_pickle, "torch_zip": torch_zip.getvalue(), "torchscript_setstate": setstate.getvalue(),
            "torchscript_reduce": _with_data_pkl(setstate.getvalue(), raw_pickle)}


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    marker = tmp_path_factory.mktemp("marker") / "code-ran"
    return marker, malicious_payloads(marker)


def _assert_one_clear_error(src, marker) -> str:
    with pytest.raises(CheckpointError) as info:
        clip_pacl.load(src)
    message = str(info.value)
    assert "\n" not in message and str(src) in message
    assert not marker.exists()
    return message


def test_payloads_run_code_under_a_trusting_loader(tmp_path):
    """The control: each payload is live, so the tests below would see it run."""
    marker = tmp_path / "code-ran"
    files = malicious_payloads(marker)
    pickle.loads(files["pickle"])
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(files["torch_zip"]), weights_only=False)
    assert marker.exists()
    marker.unlink()
    with zipfile.ZipFile(io.BytesIO(files["torchscript_reduce"])) as archive:
        pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl"))))
    assert marker.exists()
    marker.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(io.BytesIO(files["torchscript_setstate"]))
    assert marker.exists()


@pytest.mark.parametrize("suffix", EXTENSIONS)
def test_malicious_weight_files_run_nothing(payloads, suffix, tmp_path, monkeypatch):
    marker, files = payloads
    monkeypatch.setattr(torch.jit, "load", _refuse_jit_load)
    for kind, data in files.items():
        path = tmp_path / f"{kind}{suffix}"
        path.write_bytes(data)
        message = _assert_one_clear_error(path, marker)
        if suffix == ".safetensors":  # read by safetensors alone, whatever the bytes are
            assert "not a valid safetensors file" in message
        elif kind.startswith("torchscript"):
            assert "TorchScript archive clip-pacl does not read" in message
        else:
            assert "Python objects other than tensors (posix.system)" in message


def test_refused_pickles_get_no_advice_to_trust_them(tmp_path):
    """torch's own message for a refused pickle suggests `weights_only=False`; ours never passes that on."""
    archive = io.BytesIO()
    torch.save({"visual.proj": torch.ones(2)}, archive)
    (tmp_path / "odd.pt").write_bytes(_with_data_pkl(archive.getvalue(), b"not weights"))
    with pytest.raises(CheckpointError) as info:
        clip_pacl.load(tmp_path / "odd.pt")
    assert str(info.value).endswith("is not a checkpoint clip-pacl can read: torch.load(weights_only=True) refuses "
                                    "what its pickle holds")


def test_malicious_weights_in_checkpoint_directories_run_nothing(payloads, tmp_path, monkeypatch):
    """Each directory layout `load` reads, with its weights file replaced by each payload (e.g. a TorchScript
    archive named model.safetensors next to our config.json)."""
    marker, files = payloads
    monkeypatch.setattr(torch.jit, "load", _refuse_jit_load)
    model = clip_pacl.load("tiny")
    clip_pacl.save(model, tmp_path / "ours")
    hf_config = json.loads((clip_pacl.checkpoint.export_hf(model, tmp_path / "hf") / "config.json").read_text())
    layouts = {
        "ours": ({"config.json": (tmp_path / "ours" / "config.json").read_text()}, "model.safetensors"),
        "hf": ({"config.json": json.dumps(hf_config)}, "pytorch_model.bin"),
        "hf_safetensors": ({"config.json": json.dumps(hf_config)}, "model.safetensors"),
        "open_clip": ({"open_clip_config.json": json.dumps({"model_cfg": model.config.to_open_clip_dict()})},
                      "open_clip_pytorch_model.bin"),
    }
    for layout, (configs, weights_name) in layouts.items():
        for kind, data in files.items():
            folder = tmp_path / f"{layout}-{kind}"
            folder.mkdir()
            for name, text in configs.items():
                (folder / name).write_text(text)
            (folder / weights_name).write_bytes(data)
            _assert_one_clear_error(folder, marker)


def test_malicious_weights_in_the_hub_cache_run_nothing(payloads, offline_cache, tmp_path, monkeypatch):
    marker, files = payloads
    monkeypatch.setattr(torch.jit, "load", _refuse_jit_load)
    config = json.dumps({"model_cfg": clip_pacl.load("tiny").config.to_open_clip_dict()}).encode()
    for kind, data in files.items():
        for weights_name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            repo = f"acme/{kind}-{weights_name.split('.')[-1]}"
            cache_repo(offline_cache, repo, {"open_clip_config.json": config, weights_name: data})
            with pytest.raises(CheckpointError) as info:
                clip_pacl.load(repo)
            assert "\n" not in str(info.value) and str(offline_cache) in str(info.value)
    assert not marker.exists()


def test_cli_prints_one_error_line_for_malicious_files(payloads, tmp_path, capsys):
    marker, files = payloads
    for kind, data in files.items():
        for suffix in (".pt", ".safetensors"):
            path = tmp_path / f"{kind}{suffix}"
            path.write_bytes(data)
            assert cli_main(["info", str(path)]) == 2
            out, err = capsys.readouterr()
            assert out == "" and err.startswith(f"error: {path} ") and err.count("\n") == 1
    assert not marker.exists()


def test_cli_process_refuses_a_torchscript_setstate_archive(payloads, tmp_path):
    marker, files = payloads
    path = tmp_path / "ViT-B-32.pt"
    path.write_bytes(files["torchscript_setstate"])
    result = subprocess.run([sys.executable, "-m", "clip_pacl_app.cli.main", "info", str(path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {path} is a TorchScript archive clip-pacl does not read: its root is a "
                           "__torch__.") and line.endswith("with custom state, which needs the archive's code to "
                                                           "rebuild; only plain modules' weights are read")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- backbone configs
@pytest.mark.parametrize("model_args", [{"checkpoint_path": "WEIGHTS"}, {"pretrained_cfg_overlay": {"file": "WEIGHTS"}},
                                        {"drop_rate": {"nested": "WEIGHTS"}}])
def test_backbone_config_json_cannot_point_timm_at_other_files(model_args, tmp_path):
    """A timm folder's or a backbone checkpoint's config.json passes only architecture settings to timm; a loader
    argument naming a file (here a real weights file, which timm would read) is one clear error."""
    timm = require("timm")
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    timm.models.save_for_hf(reference, str(tmp_path / "timm_dir"), safe_serialization=True)
    args = json.loads(json.dumps(model_args).replace("WEIGHTS", str(tmp_path / "timm_dir" / "model.safetensors")))
    config = json.loads((tmp_path / "timm_dir" / "config.json").read_text())
    (tmp_path / "timm_dir" / "config.json").write_text(json.dumps({**config, "model_args": args}))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({
        "model_type": "backbone", "backbone": {"image": "timm/test_resnet=random", "text": f"hf={tmp_path}"},
        "image": {"arch": "test_resnet", "model_args": args}}))
    key = next(iter(model_args))
    for src in (f"backbone:timm={tmp_path / 'timm_dir'}+hf={tmp_path / 'no-text'}", tmp_path / "ckpt"):
        with pytest.raises(CheckpointError, match=f"config.json sets model_args '{key}', which clip-pacl does not "
                                                  "pass to timm"):
            clip_pacl.load(src)


def test_backbone_from_a_timm_folder_round_trips(tmp_path):
    """The settings timm's `save_for_hf` writes (num_classes, in_chans, global_pool, img_size) pass the allow-list,
    and a model built from such a folder loads back from its checkpoint."""
    timm = require("timm")
    transformers = require("transformers")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]))
    config = transformers.DistilBertConfig(vocab_size=7, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    transformers.DistilBertModel(config).save_pretrained(tmp_path / "text")
    transformers.DistilBertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "text")
    timm.models.save_for_hf(timm.create_model("test_vit", num_classes=0), str(tmp_path / "timm_dir"),
                            safe_serialization=True)
    assert {"num_classes", "img_size"} <= set(json.loads((tmp_path / "timm_dir" / "config.json").read_text())[
        "model_args"])
    model = clip_pacl.load(f"backbone:timm={tmp_path / 'timm_dir'}+hf={tmp_path / 'text'}")
    clip_pacl.save(model, tmp_path / "ckpt")
    back = clip_pacl.load(tmp_path / "ckpt")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- inference mode
def test_load_and_encode_inside_inference_mode(tmp_path):
    """Serving code may wrap everything in `torch.inference_mode()`; RN's folded-BatchNorm cache must not need
    version counters of tensors created there."""
    clip_pacl.save(clip_pacl.load("tiny-rn"), tmp_path / "rn")
    images, texts = torch.randn(2, 3, 64, 64), tokenize(["a cat", "a dog"])
    reference = clip_pacl.load(tmp_path / "rn").eval()
    with torch.no_grad():
        expected = reference.encode_image(images), reference.encode_text(texts)
    with torch.inference_mode():
        model = clip_pacl.load(tmp_path / "rn").eval()
        encoded = model.encode_image(images), model.encode_text(texts)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(encoded, expected))
