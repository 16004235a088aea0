"""Hostile files cost at most what the user allowed: kilobytes of input never cost gigabytes.

Each case writes a small file that claims far more than it holds (issue 21, items 5-11, and their siblings in other
dtypes and other loaders) and runs the `clip-pacl` command that reads it, in a child process
(`hostile_runner.py`) that reports each command's exit code, stderr, peak RSS growth and time. Every case must
give one `error:` line and exit 2, grow the peak RSS by less than RSS_BOUND and take less than SECONDS_BOUND. Before
the loaders checked sizes, each of these allocated what the file claimed (0.5 to 2 GB at these sizes) or printed a
traceback. The runner caps its heap, so a regression fails the bound instead of exhausting the machine.
"""

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_pacl
from clip_pacl.checkpoint.files import atomic_write, load_state_into, save_weights
from clip_pacl.config import CLIPConfig
from clip_pacl.errors import CheckpointError, ConfigError
from clip_pacl.formats import convert_hf, convert_open_clip
from clip_pacl.models.clip import CLIP
from clip_pacl.models.pacl import PACL
from clip_pacl.retrieval import ImageIndex
from clip_pacl.retrieval.ann import AnnIndex
from helpers import require
from test_safe_loading import _hand_made_archive, _Module, _Tensor

RSS_BOUND = 250 * 2**20  # growth of the peak RSS over the RSS before the command
SECONDS_BOUND = 120  # generous: the 2-core machine is shared; each case takes seconds
VOCAB = 4_000_000  # a stride-0 token embedding of VOCAB x 128 floats: 2 GB once materialised
BIG = 512 * 2**20  # bytes of zeros a compressed entry inflates to
WIDE = {"width": 1024, "layers": 12}  # a config declaring a CLIP of about 1.2 GB around tiny weights
RUNNER = Path(__file__).with_name("hostile_runner.py")


# ---------------------------------------------------------------------------------------------- generators
def _tiny() -> CLIP:
    return CLIP(CLIPConfig.from_name("tiny"))


def _open_clip_state(tiny: CLIP) -> dict:
    return convert_open_clip.to_open_clip(tiny.state_dict())


def _stride0(state: dict, dtype=torch.float32) -> dict:
    """The text tower's token embedding as a stride-0 view: one stored element standing for VOCAB x 128."""
    return {**state, "token_embedding.weight": torch.zeros(1, dtype=dtype).expand(VOCAB, 128)}


def _overlapping(state: dict) -> dict:
    """Each row of the token embedding starts one element after the last: 128 stored floats for VOCAB rows."""
    return {**state, "token_embedding.weight": torch.zeros(VOCAB + 127).as_strided((VOCAB, 128), (1, 1))}


def _write_deflated_zeros(archive: zipfile.ZipFile, name: str, nbytes: int) -> None:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = bytes(2**20)
    with archive.open(info, "w", force_zip64=True) as f:
        for _ in range(nbytes // len(chunk)):
            f.write(chunk)


def _deflated_torch_zip(path: Path) -> None:
    """A torch.save zip whose one storage (BIG bytes, as its pickle declares) is deflated to about 0.5 MB."""
    buffer = io.BytesIO()
    torch.save({"visual.conv1.weight": torch.zeros(4)}, buffer)
    numel = (BIG // 4).to_bytes(4, "little")
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                _write_deflated_zeros(dst, info.filename, BIG)
                continue
            data = src.read(info)
            if info.filename.endswith("data.pkl"):  # storage numel 4 -> BIG / 4, and the tensor's size with it
                data = data.replace(b"K\x04t", b"J" + numel + b"t").replace(b"K\x04\x85", b"J" + numel + b"\x85")
            dst.writestr(info, data)


def _deflated_torchscript(path: Path) -> None:
    """A TorchScript archive with one deflated storage of BIG bytes whose declared size matches."""
    _hand_made_archive(path, _Module(weight=_Tensor(0, (BIG // 4,), (1,))), None, numel=BIG // 4)
    with zipfile.ZipFile(path, "a") as archive:
        _write_deflated_zeros(archive, "m/data/0", BIG)


def _with_config(folder: Path, name: str, edit) -> Path:
    cfg = json.loads((folder / name).read_text())
    edit(cfg)
    (folder / name).write_text(json.dumps(cfg))
    return folder


def _widen(tower: dict, width_key: str = "width", layers_key: str = "layers") -> None:
    tower[width_key], tower[layers_key] = WIDE["width"], WIDE["layers"]


def _big_member_shard(path: Path, image: bytes) -> None:
    """A gzip tar: one good sample, then one whose image member is BIG bytes of zeros (about 0.5 MB compressed)."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        good = tarfile.TarInfo("a.png")
        good.size = len(image)
        tar.addfile(good, io.BytesIO(image))
        big = tarfile.TarInfo("b.png")
        big.size = BIG
        tar.addfile(big, _Zeros(BIG))


class _Zeros(io.RawIOBase):
    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def _ann_index(folder: Path, factory: str) -> Path:
    g = torch.Generator().manual_seed(0)
    index = ImageIndex(F.normalize(torch.randn(300, 128, generator=g), dim=-1),  # tiny's width: search reaches faiss
                       [f"/img/{i}.png" for i in range(300)], {"model": "tiny"})
    index.build_ann(factory)
    index.save(folder)
    return folder / "ann.faiss"


def _patch_u64(path: Path, position: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[position:position + 8] = value.to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _faiss_codes_claim(folder: Path) -> Path:
    """A PQ fast-scan index (what `auto` builds) whose PQ centroids claim BIG bytes (faiss zero-fills the claimed
    array before it reads): their length is the first 8 bytes after the header that hold their count."""
    faiss = require("faiss")
    path = _ann_index(folder, "PQ64x4fs")
    count = faiss.downcast_index(faiss.read_index(str(path))).pq.centroids.size()
    data = path.read_bytes()
    field = next(p for p in range(30, len(data) - 8) if int.from_bytes(data[p:p + 8], "little") == count)
    _patch_u64(path, field, BIG // 4)
    return folder


def _ivf_ids(folder: Path) -> Path:
    """An IVF index with one list whose stored ids (the file's last 300 x 8 bytes) are all past its 300 rows."""
    require("faiss")
    path = _ann_index(folder, "IVF1,Flat")
    for row in range(300):
        _patch_u64(path, path.stat().st_size - 8 * (row + 1), 10**6)
    return folder


def _npy_claim(folder: Path) -> Path:
    index = ImageIndex(F.normalize(torch.randn(3, 16), dim=-1), ["/a.png", "/b.png", "/c.png"], {"model": "tiny"})
    index.save(folder)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 128)})
    (folder / "embeddings.npy").write_bytes(header.getvalue() + bytes(192))
    return folder


def _hf_dir(folder: Path, tiny: CLIP, edit) -> Path:
    convert_hf.write_hf_dir(tiny.config, tiny.state_dict(), folder)
    return _with_config(folder, "config.json", edit)


def _cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (clip-pacl argv, what its error line says)."""
    tiny = _tiny()
    oc = _open_clip_state(tiny)
    cases: dict[str, tuple[list[str], str]] = {}

    def saved(name: str, obj, **kwargs) -> str:
        torch.save(obj, root / name, **kwargs)
        return str(root / name)

    # item 5: stride-0 and overlapping views, in every torch format
    cases["stride0_torch_zip"] = ["info", saved("stride0.pt", _stride0(oc))], "is a stride-0 view"
    cases["stride0_fp16"] = ["info", saved("stride0_fp16.bin", _stride0(oc, torch.float16))], "is a stride-0 view"
    cases["stride0_legacy_pickle"] = (["info", saved("legacy.pt", _stride0(oc), _use_new_zipfile_serialization=False)],
                                      "is a stride-0 view")
    cases["overlapping_view"] = ["info", saved("overlap.pt", _overlapping(oc))], "is an overlapping view"
    _hand_made_archive(root / "stride0_ts.pt", _Module(weight=_Tensor(0, (VOCAB, 128), (0, 0))))
    cases["stride0_torchscript"] = ["info", str(root / "stride0_ts.pt")], "is a stride-0 view"
    # item 6: a config declaring a large model around tiny weights, in every directory format
    pacl = clip_pacl.save(PACL(tiny), root / "pacl")
    _with_config(pacl, "config.json", lambda c: (_widen(c["clip"]["vision"]), _widen(c["clip"]["text"])))
    cases["pacl_dir_wide_config"] = ["info", str(pacl)], "does not match the model"
    ours = clip_pacl.save(tiny, root / "ours")
    _with_config(ours, "config.json", lambda c: _widen(c["vision"]))
    cases["clip_dir_wide_config"] = ["info", str(ours)], "does not match the model"
    hf = _hf_dir(root / "hf", tiny, lambda c: _widen(c["vision_config"], "hidden_size", "num_hidden_layers"))
    cases["hf_dir_wide_config"] = ["info", str(hf)], "the HF checkpoint lacks"
    (root / "oc").mkdir()
    save_weights(oc, root / "oc" / "open_clip_model.safetensors")
    cfg = tiny.config.to_open_clip_dict()
    _widen(cfg["vision_cfg"])
    (root / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    cases["open_clip_dir_wide_config"] = ["info", str(root / "oc")], "does not match the model"
    huge = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "width": 16384, "layers": 128, "head_width": 64}}
    (root / "huge.json").write_text(json.dumps(huge))
    cases["config_over_model_limit"] = ["info", str(root / "huge.json")], "over the 16.0 GiB limit"
    # item 7: compressed storages
    _deflated_torchscript(root / "deflated_ts.pt")
    cases["deflated_torchscript"] = (["info", str(root / "deflated_ts.pt")],
                                     "declares 512.0 MiB of tensor data but the file holds only")
    _deflated_torch_zip(root / "deflated.pt")
    cases["deflated_torch_zip"] = ["info", str(root / "deflated.pt")], "declares 512.0 MiB of tensor data"
    # items 9, 10, 11: index files
    cases["faiss_codes_claim"] = ["search", str(_faiss_codes_claim(root / "idx_pq")), "cat"], "claims more memory"
    cases["ivf_id_out_of_range"] = ["search", str(_ivf_ids(root / "idx_ivf")), "cat"], "lists id 1000000"
    cases["npy_header_claim"] = ["search", str(_npy_claim(root / "idx_npy")), "cat"], "header declares"
    # item 11: config values that raised ZeroDivisionError, AttributeError, TypeError
    edits = {
        "hf_zero_heads": (lambda c: c["vision_config"].update(num_attention_heads=0), "num_attention_heads 0"),
        "hf_text_config_string": (lambda c: c.update(text_config="clip"), "text_config must be an object"),
        "hf_model_type_list": (lambda c: c.update(model_type=["clip"]), "only HF CLIPModel checkpoints are read"),
        "hf_layers_string": (lambda c: c["text_config"].update(num_hidden_layers="abc"), "must be a whole number"),
    }
    for name, (edit, message) in edits.items():
        cases[name] = ["info", str(_hf_dir(root / name, tiny, edit))], message
    for name, edit, message in (
            ("ours_unknown_vision_key", lambda c: c["vision"].update(depth=3), "unknown vision setting 'depth'"),
            ("ours_layers_string", lambda c: c["vision"].update(layers="abc"), "vision.layers must be a whole number"),
            ("ours_model_type_list", lambda c: c.update(model_type=["clip"]), "model_type that is not a string"),
            ("ours_text_not_object", lambda c: c.update(text="abc"), "text must be an object")):
        cases[name] = ["info", str(_with_config(clip_pacl.save(tiny, root / name), "config.json", edit))], message
    return cases


# ---------------------------------------------------------------------------------------------- the runs
def run_cases(cases: dict[str, list[str]], tmp: Path) -> dict[str, dict]:
    (tmp / "cases.json").write_text(json.dumps(list(cases.items())))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(RUNNER), str(tmp / "cases.json")], capture_output=True, text=True,
                          env=env, timeout=1800)
    results = {r["name"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert results, done.stderr[-3000:]
    return results


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    cases = _cases(root)
    return cases, run_cases({name: argv for name, (argv, _) in cases.items()}, root)


CASE_NAMES = [
    "stride0_torch_zip", "stride0_fp16", "stride0_legacy_pickle", "overlapping_view", "stride0_torchscript",
    "pacl_dir_wide_config", "clip_dir_wide_config", "hf_dir_wide_config", "open_clip_dir_wide_config",
    "config_over_model_limit", "deflated_torchscript", "deflated_torch_zip", "faiss_codes_claim",
    "ivf_id_out_of_range", "npy_header_claim", "hf_zero_heads", "hf_text_config_string", "hf_model_type_list",
    "hf_layers_string", "ours_unknown_vision_key", "ours_layers_string", "ours_model_type_list",
    "ours_text_not_object",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_hostile_file_is_one_error_line_in_bounded_memory_and_time(hostile, name):
    cases, results = hostile
    assert sorted(cases) == sorted(CASE_NAMES)
    result, expected = results[name], cases[name][1]
    assert result["code"] == 2, result["stderr"]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert result["rss_growth"] < RSS_BOUND, f"{result['rss_growth'] / 2**20:.0f} MB"
    assert result["children_rss"] < RSS_BOUND + 2**30  # the faiss check's child: Python + faiss + its heap cap
    assert result["seconds"] < SECONDS_BOUND


def test_a_tar_member_over_the_limit_is_skipped_unread(tmp_path):
    """Item 8: `index build --images SHARD.tar` with a BIG member reads the good sample and reports the big one as
    unreadable, without reading it into memory."""
    image = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(image, format="PNG")
    _big_member_shard(tmp_path / "shard.tar", image.getvalue())
    argv = ["index", "build", "--model", "tiny", "--random-weights", "--images", str(tmp_path / "shard.tar"), "--out",
            str(tmp_path / "i")]
    result = run_cases({"tar": argv}, tmp_path)["tar"]
    assert result["code"] == 0, result["stderr"]
    assert "over the 64.0 MiB limit for one tar member" in result["stdout"] + result["stderr"]
    assert len(ImageIndex.load(tmp_path / "i")) == 1
    assert result["rss_growth"] < RSS_BOUND, f"{result['rss_growth'] / 2**20:.0f} MB"
    assert result["seconds"] < SECONDS_BOUND


def test_the_model_size_limit_is_a_stated_override(tmp_path, monkeypatch):
    """CLIP_PACL_MAX_MODEL_BYTES lowers (or raises) the limit; a bad value is one line."""
    clip_pacl.save(_tiny(), tmp_path / "m")
    monkeypatch.setenv("CLIP_PACL_MAX_MODEL_BYTES", str(10**6))
    with pytest.raises(CheckpointError, match=r"declares a model of .* over the 976.6 KiB limit"):
        clip_pacl.load(tmp_path / "m")
    with pytest.raises(CheckpointError, match="over the 976.6 KiB limit"):
        clip_pacl.load("tiny")
    monkeypatch.setenv("CLIP_PACL_MAX_MODEL_BYTES", "lots")
    with pytest.raises(ConfigError, match="must be a positive number of bytes"):
        clip_pacl.load(tmp_path / "m")
    monkeypatch.delenv("CLIP_PACL_MAX_MODEL_BYTES")
    assert isinstance(clip_pacl.load(tmp_path / "m"), CLIP)


# ---------------------------------------------------------------------------------------------- mutation survivors
def test_atomic_write_never_writes_the_target_in_place(tmp_path):
    """A write that fails half-way leaves the old file whole, and the target is written only by the rename."""
    target = tmp_path / "file.json"
    target.write_text("old")
    seen = []

    def half_write(tmp: str) -> None:
        seen.append(tmp)
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_write)
    assert target.read_text() == "old" and seen and Path(seen[0]) != target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]  # and the temporary file is gone
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new"


def test_load_state_into_refuses_missing_tensors():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"x.pt does not match the model: missing 1 tensors \(e.g. bias\)"):
        load_state_into(model, {"weight": torch.zeros(2, 2)}, "x.pt")
    with pytest.raises(CheckpointError, match="1 unexpected tensors"):
        load_state_into(model, {"weight": torch.zeros(2, 2), "bias": torch.zeros(2), "extra": torch.zeros(1)}, "x.pt")


def test_search_refuses_rows_the_index_does_not_have():
    """Ids past the row count that reach a search by another way than the file (load_ann checks the file's) are a
    one-line CheckpointError, not an IndexError from the re-ranking."""
    faiss = require("faiss")
    vectors = F.normalize(torch.randn(300, 16), dim=-1)
    index = faiss.index_factory(16, "IVF1,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors.numpy())
    index.add_with_ids(vectors.numpy(), np.arange(300, dtype=np.int64) + 10**6)
    ann = AnnIndex(index, {"factory": "IVF1,Flat", "nprobe": 1, "ef_search": None, "rerank": 1})
    with pytest.raises(CheckpointError, match="returned row 1000"):
        ann.search(vectors[:2], 5, vectors)
