"""Losses across 2 gloo processes equal the single-process loss (and gradients) of the same global batch."""

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip_pacl.losses import get_objective

B_LOCAL, DIM, WORLD = 4, 8, 2


def _global_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * B_LOCAL, DIM, generator=g), torch.randn(WORLD * B_LOCAL, DIM, generator=g)


def _loss_and_grads(name, raw_img, raw_txt, **kw):
    """Loss and gradients w.r.t. the raw features, the temperature and the bias."""
    objective = get_objective(name)
    raw_img, raw_txt = raw_img.clone().requires_grad_(True), raw_txt.clone().requires_grad_(True)
    scale = torch.tensor(objective.init_logit_scale or math.log(1 / 0.07), requires_grad=True)
    bias = None if objective.init_logit_bias is None else torch.tensor(objective.init_logit_bias, requires_grad=True)
    loss = objective.loss(F.normalize(raw_img, dim=-1), F.normalize(raw_txt, dim=-1), scale, bias, **kw)
    loss.backward()
    grads = [raw_img.grad, raw_txt.grad, scale.grad] + ([bias.grad] if bias is not None else [])
    return loss.detach(), grads


def _worker(rank, port, name, local_loss, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        img, txt = _global_batch()
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        loss, grads = _loss_and_grads(name, img[rows], txt[rows], local_loss=local_loss)
        # What DDP does to parameter gradients: average them over ranks. Feature gradients stay per rank.
        shared = [g.clone() for g in grads[2:]]
        for g in shared:
            dist.all_reduce(g)
            g /= WORLD
        losses = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(losses, loss)
        out[rank] = {"loss": torch.stack(losses).mean(), "features": grads[:2], "shared": shared}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("local_loss", [False, True])
def test_two_process_loss_matches_single_process(name, local_loss):
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), name, local_loss, out), nprocs=WORLD, join=True)
    img, txt = _global_batch()
    loss, grads = _loss_and_grads(name, img, txt)
    for rank in range(WORLD):
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        assert torch.allclose(out[rank]["loss"], loss, atol=1e-5)
        # DDP averages parameter gradients over ranks; a feature's gradient must therefore be WORLD x the
        # single-process one so that, through the parameters, the average equals the global gradient.
        assert torch.allclose(out[rank]["features"][0] / WORLD, grads[0][rows], atol=1e-6)
        assert torch.allclose(out[rank]["features"][1] / WORLD, grads[1][rows], atol=1e-6)
        for got, want in zip(out[rank]["shared"], grads[2:]):
            assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.timeout(300)
def test_torchrun_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    """`torchrun --nproc-per-node 2 -m clip_pacl.train` (gloo, CPU) ends with the weights of 1 process, batch 2B."""
    import subprocess
    import sys

    import clip_pacl
    from clip_pacl.cli.main import main
    from clip_pacl.data.synthetic import generate_synthetic

    generate_synthetic(tmp_path / "data", 32, seed=0, image_size=64)
    common = ["--data", str(tmp_path / "data" / "captions.csv"), "--model", "tiny", "--steps", "3", "--lr", "1e-3",
              "--warmup", "1", "--device", "cpu", "--no-progress", "--log-every", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "clip_pacl.train", *common, "--batch-size", "8", "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", *common, "--batch-size", "16", "--out", str(tmp_path / "single")]) == 0
    ddp, single = clip_pacl.load(tmp_path / "ddp" / "final"), clip_pacl.load(tmp_path / "single" / "final")
    start = clip_pacl.load("tiny")
    moved = 0.0
    for (name, a), b in zip(ddp.state_dict().items(), single.state_dict().values()):
        assert torch.allclose(a, b, atol=2e-5), name
        moved = max(moved, float((b - start.state_dict()[name]).abs().max()))
    assert moved > 1e-3  # the comparison is not between two untrained models
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ddp_log] == pytest.approx([r["loss"] for r in single_log], abs=1e-4)


def test_rank_and_world_come_from_torchrun_else_slurm(monkeypatch):
    from clip_pacl.train.distributed import DistInfo, env_dist_info

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert env_dist_info() == DistInfo(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert env_dist_info() == DistInfo(5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env_dist_info() == DistInfo(2, 4, 0)  # torchrun's variables win


@pytest.mark.timeout(300)
def test_torchrun_on_uneven_webdataset_shards_ends_epochs_together(tmp_path):
    """One rank streams a 24-sample shard, the other an 8-sample one: when the small one runs out, both end the epoch.

    Without that agreement the ranks drift into different epochs (the small shard is re-read while the big one is
    still in its first pass), and the checkpoint, written by rank 0 with rank 0's epoch and position, would
    resume the other rank at the wrong place.
    """
    import io
    import subprocess
    import sys
    import tarfile

    from PIL import Image

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for shard, n in enumerate((24, 8)):
        with tarfile.open(tmp_path / f"shard-{shard:06d}.tar", "w") as tar:
            for i in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (64, 64), (i * 9 % 256, 40 * shard, 200)).save(buf, format="PNG")
                add(tar, f"s{shard}_{i:04d}.png", buf.getvalue())
                add(tar, f"s{shard}_{i:04d}.txt", f"a picture number {i} of shard {shard}".encode())
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "clip_pacl.train", "--data", str(tmp_path / "shard-{000000..000001}.tar"), "--model", "tiny",
         "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup", "1", "--device", "cpu", "--no-progress",
         "--log-every", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    # 32 samples / 2 ranks / batch 4 = 4 steps an epoch by length, 8 for --epochs 2; whichever rank holds the
    # 8-sample shard ends every epoch after 2 steps, for both ranks
    assert steps == list(range(1, 9))
    assert [r["epoch"] for r in log if "loss" in r] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (out / "final").is_dir()
