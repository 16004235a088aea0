"""Datasets and loaders: bad images counted, seeded order, exact resume, DDP shards, webdataset shards."""

import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clip_pacl.data import (
    CaptionDataset,
    CaptionRow,
    TokenBatch,
    build_caption_dataset,
    build_loader,
    collate_skip_bad,
    set_loader_epoch,
)
from clip_pacl.errors import DataError

L = 12


def augment(image):
    """A stand-in train transform with randomness from both torch and Python's random."""
    pixels = torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32) / 255).permute(2, 0, 1)  # (3, 4, 4)
    return pixels + torch.rand(()) + random.random()


def tokenize(text):
    ids = [ord(c) for c in text[:L]]
    return torch.tensor([ids + [0] * (L - len(ids))])  # (1, L)


def caption_of(tokens):
    return "".join(chr(int(t)) for t in tokens if t)


def _write_images(folder, n, bad=()):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        if i not in bad:
            Image.new("RGB", (6, 6), (i * 7 % 256, 50, 90)).save(path)
        rows.append(CaptionRow(path, f"cap {i}"))
    return rows


def test_bad_images_become_none_and_are_counted(tmp_path):
    rows = _write_images(tmp_path, 10, bad={2, 5, 7})
    (tmp_path / "002.png").write_bytes(b"garbage")  # corrupt
    good = (tmp_path / "000.png").read_bytes()
    (tmp_path / "005.png").write_bytes(good[: len(good) // 2])  # truncated; 007.png is missing
    ds = CaptionDataset(rows, augment, tokenize)
    assert ds[2] is None and ds[5] is None and ds[7] is None
    image, tokens = ds[0]
    assert image.shape == (3, 4, 4) and tokens.shape == (L,) and caption_of(tokens) == "cap 0"
    batches = list(build_loader(ds, batch_size=4, shuffle=False, workers=0, seed=0, drop_last=False))
    assert [b.n_total for b in batches] == [4, 4, 2]
    assert [b.n_bad for b in batches] == [1, 2, 0]
    assert batches[0].images.shape == (3, 3, 4, 4) and batches[0].texts.dtype == torch.long
    assert sum(len(b.texts) for b in batches) == 7 and sum(len(b) for b in batches) == 7
    assert all(isinstance(b, TokenBatch) for b in batches)


def test_collate_of_an_all_bad_batch():
    out = collate_skip_bad([None, None])
    assert isinstance(out, TokenBatch) and len(out) == 0
    assert out.n_bad == 2 and out.n_total == 2 and len(out.images) == 0 and len(out.texts) == 0


def test_a_batch_moves_as_one_and_keeps_its_type():
    """Lightning and the loop move a batch with `.to` (DataLoader pins it with `.pin_memory`): the type and the
    loader's counts come along."""
    batch = collate_skip_bad([(torch.zeros(3, 4, 4), torch.tensor([49406, 7, 49407])), None])
    moved = batch.to("cpu", non_blocking=True)
    assert isinstance(moved, TokenBatch) and (moved.n_bad, moved.n_total, len(moved)) == (1, 2, 1)
    assert torch.equal(moved.texts, batch.texts) and moved.texts.dtype == torch.long
    assert [t.shape for t in moved.inputs] == [(1, 3, 4, 4), (1, 3)]


def _captions(batches):
    return [[caption_of(t) for t in b.texts] for b in batches]


def test_loader_order_is_seeded_per_epoch_and_resumes_exactly(tmp_path):
    ds = CaptionDataset(_write_images(tmp_path, 22), augment, tokenize)
    kwargs = dict(batch_size=4, shuffle=True, workers=0, seed=5, drop_last=True)
    full = list(build_loader(ds, epoch=1, **kwargs))
    assert len(full) == 5 and sorted(sum(_captions(full), [])) != sum(_captions(full), [])  # shuffled
    again = list(build_loader(ds, epoch=1, **kwargs))
    assert _captions(again) == _captions(full)
    assert all(torch.equal(a.images, b.images) for a, b in zip(full, again))  # augmentation too
    assert _captions(build_loader(ds, epoch=2, **kwargs)) != _captions(full)
    resumed = build_loader(ds, epoch=1, start_batch=3, **kwargs)
    assert len(resumed) == 2
    resumed_batches = list(resumed)
    assert _captions(resumed_batches) == _captions(full[3:])
    assert all(torch.equal(a.images, b.images) for a, b in zip(resumed_batches, full[3:]))
    set_loader_epoch(resumed, 2)  # later epochs start from their first batch
    assert _captions(resumed) == _captions(build_loader(ds, epoch=2, **kwargs))
    # Item randomness never leaks into the caller's RNG stream.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(build_loader(ds, epoch=1, **kwargs))
    assert torch.equal(torch.rand(3), expected)


def test_workers_give_the_same_batches_as_the_main_process(tmp_path):
    ds = CaptionDataset(_write_images(tmp_path, 12), augment, tokenize)
    kwargs = dict(batch_size=4, shuffle=True, seed=1, drop_last=False, epoch=3)
    main_process = list(build_loader(ds, workers=0, **kwargs))
    loader = build_loader(ds, workers=2, **kwargs)
    assert loader.persistent_workers
    in_workers = list(loader)
    assert _captions(in_workers) == _captions(main_process)
    assert all(torch.equal(a.images, b.images) for a, b in zip(main_process, in_workers))


def test_ranks_split_the_data_disjointly(tmp_path):
    ds = CaptionDataset(_write_images(tmp_path, 11), augment, tokenize)
    per_rank = [sum(_captions(build_loader(ds, batch_size=2, shuffle=True, workers=0, seed=0, drop_last=False,
                                           rank=r, world_size=3)), []) for r in range(3)]
    assert [len(c) for c in per_rank] == [3, 3, 3]  # equal steps on every rank
    assert len(set(sum(per_rank, []))) == 9


def test_build_caption_dataset_splits_by_image(tmp_path):
    _write_images(tmp_path / "images", 10)
    lines = ["image,caption"] + [f"images/{i % 10:03d}.png,cap {i}" for i in range(30)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    train, val = build_caption_dataset(tmp_path / "data.csv", transform=augment, tokenizer=tokenize,
                                       val_fraction=0.2, seed=0, val_transform=lambda im: torch.zeros(3, 4, 4))
    assert len(train) == 24 and len(val) == 6
    assert not {r.image for r in train.rows} & {r.image for r in val.rows}
    assert val[0][0].abs().sum() == 0  # the validation side uses its own (eval) transform
    only, none = build_caption_dataset(tmp_path / "data.csv", transform=augment, tokenizer=tokenize)
    assert none is None and len(only) == 30


# --- webdataset shards ---------------------------------------------------------------------------------------


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png_bytes(i):
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (i * 9 % 256, 20, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    """Two shards of 6 samples: sample 3 has a corrupt image, sample 8 has no caption; json and txt captions."""
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:06d}.tar", "w") as tar:
            for i in range(shard * 6, shard * 6 + 6):
                key = f"s{i:04d}"
                _add(tar, f"{key}.png", b"broken" if i == 3 else _png_bytes(i))
                if i == 8:
                    continue
                if i % 2:
                    _add(tar, f"{key}.json", json.dumps({"caption": f"cap {i}"}).encode())
                else:
                    _add(tar, f"{key}.txt", f"cap {i}".encode())
    return tmp_path


def test_wds_reads_every_sample_and_counts_bad_ones(shards):
    pattern = str(shards / "shard-{000000..000001}.tar")
    train, val = build_caption_dataset(pattern, transform=augment, tokenizer=tokenize)
    assert val is None and len(train) == 12
    batches = list(build_loader(train, batch_size=5, shuffle=False, workers=0, seed=0, drop_last=False))
    assert sum(b.n_total for b in batches) == 12 and sum(b.n_bad for b in batches) == 2
    assert sorted(sum(_captions(batches), [])) == sorted(f"cap {i}" for i in range(12) if i not in (3, 8))


def test_wds_shuffle_is_seeded_and_resume_skips_exactly(shards):
    ds, _ = build_caption_dataset(str(shards), data_format="wds", transform=augment, tokenizer=tokenize)
    kwargs = dict(batch_size=2, shuffle=True, seed=3, drop_last=False, epoch=1)
    full = list(build_loader(ds, workers=0, **kwargs))
    assert _captions(list(build_loader(ds, workers=0, **kwargs))) == _captions(full)
    resumed = list(build_loader(ds, workers=0, start_batch=2, **kwargs))
    assert _captions(resumed) == _captions(full[2:])
    assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, full[2:]))
    two_workers = _captions(build_loader(ds, workers=2, **kwargs))
    assert _captions(build_loader(ds, workers=2, start_batch=3, **kwargs)) == two_workers[3:]


def test_wds_validation_split_and_missing_shards(shards):
    train, val = build_caption_dataset(str(shards / "shard-{000000..000001}.tar"), transform=augment,
                                       tokenizer=tokenize, val_fraction=0.5)
    assert train.shards == [str(shards / "shard-000000.tar")] and val.shards == [str(shards / "shard-000001.tar")]
    with pytest.raises(DataError, match="1 of 3 shards do not exist"):
        build_caption_dataset(str(shards / "shard-{000000..000002}.tar"), transform=augment, tokenizer=tokenize)
    with pytest.raises(DataError, match="cannot be split across 3 ranks"):
        build_loader(train, batch_size=2, shuffle=False, workers=0, seed=0, drop_last=False, rank=0, world_size=3)


def test_data_check_reads_shards(shards):
    from clip_pacl.data.check import check_caption_data

    report = check_caption_data(shards / "shard-{000000..000001}.tar")
    assert (report.format, report.rows, report.bad_images) == ("wds", 12, 2)
    assert report.mean_caption_words == 2.0
    assert check_caption_data(str(shards), data_format="wds", limit=5).rows == 5
