"""Losses across 2 gloo processes equal the single-process loss (and gradients) of the same global batch."""

import json
import math
import os
import queue
import re
import socket
import subprocess
import sys
import traceback
from pathlib import Path

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
    scale = torch.tensor(objective.init_logit_scale or math.log(1 / 0.07), requires_grad=True)  # the log parameter
    bias = None if objective.init_logit_bias is None else torch.tensor(objective.init_logit_bias, requires_grad=True)
    loss = objective.loss(F.normalize(raw_img, dim=-1), F.normalize(raw_txt, dim=-1), scale.exp(), bias, **kw)
    loss.backward()
    grads = [raw_img.grad, raw_txt.grad, scale.grad] + ([bias.grad] if bias is not None else [])
    return loss.detach(), grads


def _worker(rank, name, local_loss):
    """One rank's share of the global batch: its loss averaged over ranks and the gradients DDP would leave."""
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
    return {"loss": torch.stack(losses).mean(), "features": grads[:2], "shared": shared}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_loop(rank, port, jobs, results):
    """One rank of a gloo group that lives as long as the module's tests: it joins the group once, then runs each job
    (fn, args) it is sent as fn(rank, *args), and answers (rank, result, None) or (rank, None, the traceback)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        while (job := jobs.get()) is not None:
            fn, args = job
            try:
                results.put((rank, fn(rank, *args), None))
            except Exception:
                results.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class Ranks:
    """WORLD spawned processes in one gloo group, started once for all the loss tests below rather than once per test
    (each start imports torch in every rank). `run(fn, *args)` runs fn(rank, *args) on every rank at once and returns
    {rank: result}. A rank that raised or did not answer (the other may then wait in a collective for ever) fails the
    test and ends the group; the next test starts a new one."""

    def __init__(self):
        self.procs, self.jobs, self.results = [], [], None

    def run(self, fn, *args, timeout: float = 100) -> dict:
        if not self.procs:
            ctx = mp.get_context("spawn")
            port, self.jobs, self.results = _free_port(), [ctx.Queue() for _ in range(WORLD)], ctx.Queue()
            self.procs = [ctx.Process(target=_rank_loop, args=(rank, port, self.jobs[rank], self.results), daemon=True)
                          for rank in range(WORLD)]
            for proc in self.procs:
                proc.start()
        for jobs in self.jobs:
            jobs.put((fn, args))
        out, errors = {}, []
        try:
            for _ in range(WORLD):
                rank, result, error = self.results.get(timeout=timeout)
                out[rank] = result
                if error:
                    errors.append(f"rank {rank}:\n{error}")
        except queue.Empty:
            errors.append(f"ranks {sorted(set(range(WORLD)) - set(out))} did not answer in {timeout} s")
        if errors:
            self.stop(wait=0)
            pytest.fail("\n".join(errors))
        return out

    def stop(self, wait: float = 10) -> None:
        for jobs in self.jobs:
            jobs.put(None)
        for proc in self.procs:
            proc.join(wait)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs = []


@pytest.fixture(scope="module")
def ranks():
    group = Ranks()
    yield group
    group.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("local_loss", [False, True])
def test_two_process_loss_matches_single_process(name, local_loss, ranks):
    out = ranks.run(_worker, name, local_loss)
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


def _row_losses(name, img, txt):
    """Per-row losses of one process's batch (clip: mean of the two cross-entropies; siglip: a row's sum)."""
    objective = get_objective(name)
    scale = torch.tensor(objective.init_logit_scale or math.log(1 / 0.07)).exp()
    logits = objective.pair_logits(img, txt, scale, None if objective.init_logit_bias is None
                                   else torch.tensor(objective.init_logit_bias))
    labels = torch.arange(len(img))
    if name == "siglip":
        signs = 2 * torch.eye(len(img)) - 1
        return -F.logsigmoid(signs * logits).sum(1)
    return (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")) / 2


def _uneven_worker(rank, name, local_loss, rows):
    img, txt = _uneven_batch(name, sum(rows))
    mine = slice(sum(rows[:rank]), sum(rows[: rank + 1]))
    loss, grads = _loss_and_grads(name, img[mine], txt[mine], local_loss=local_loss, capacity=max(rows) + 1)
    losses = [torch.zeros(()) for _ in range(WORLD)]
    dist.all_gather(losses, loss)
    return {"loss": torch.stack(losses).mean(), "features": grads[:2]}


def _uneven_batch(name, n):
    g = torch.Generator().manual_seed(1)
    image_shape = (n, 3, DIM) if name == "pacl" else (n, DIM)  # PACL's image side: patch embeddings
    return torch.randn(*image_shape, generator=g), torch.randn(n, DIM, generator=g)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,local_loss", [("clip", False), ("siglip", False), ("pacl", False),
                                             ("clip", True), ("siglip", True)])
def test_ranks_with_different_row_counts_gather_padded_rows_and_match_one_process(name, local_loss, ranks):
    """Rank 0 holds 4 rows, rank 1 holds 2 (it lost unreadable images); each pads to a capacity of 5, which no row
    count exchange tells it: the padding must not leak into the loss or the gradients. Global loss: equal to one
    process on the 6 rows. Local loss: each rank's loss is the mean over its own rows (DDP averages the ranks)."""
    rows = (4, 2)
    out = ranks.run(_uneven_worker, name, local_loss, rows)
    img, txt = _uneven_batch(name, sum(rows))
    if not local_loss:
        want, grads = _loss_and_grads(name, img, txt)
    else:  # the mean over ranks of each rank's mean row loss, and its gradient w.r.t. the raw features
        img, txt = img.requires_grad_(True), txt.requires_grad_(True)
        per_row = _row_losses(name, F.normalize(img, dim=-1), F.normalize(txt, dim=-1))
        want = torch.stack([per_row[: rows[0]].mean(), per_row[rows[0]:].mean()]).mean()
        grads = torch.autograd.grad(want, [img, txt])
    for rank in range(WORLD):
        mine = slice(sum(rows[:rank]), sum(rows[: rank + 1]))
        assert out[rank]["features"][0].shape[0] == rows[rank]
        assert torch.allclose(out[rank]["loss"], want.detach(), atol=1e-5), (out[rank]["loss"], want)
        assert torch.allclose(out[rank]["features"][0] / WORLD, grads[0][mine], atol=1e-6)
        assert torch.allclose(out[rank]["features"][1] / WORLD, grads[1][mine], atol=1e-6)


TRAIN_STEPS = 6


def _train_args(runs: Path, *extra: str) -> list[str]:
    """32 images, global batch 16: 2 steps an epoch, so 6 steps cross epochs; every run starts from runs/init."""
    # eps 1e-6: with the default 1e-8, a gradient entry that is float noise (summed in another order by 2 ranks)
    # takes a full Adam step in either direction, and the runs could not be compared weight for weight.
    return ["--data", str(runs / "data" / "captions.csv"), "--model", str(runs / "init"), "--steps", str(TRAIN_STEPS),
            "--lr", "1e-3", "--warmup", "1", "--eps", "1e-6", "--device", "cpu", "--no-progress", "--log-every", "1",
            *extra]


def _torchrun(runs: Path, out: Path, *extra: str, start_new_session: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "clip_pacl_app", "train", *_train_args(runs, "--batch-size", "8", "--out", str(out), *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=start_new_session)


def _state(path: Path) -> dict[str, torch.Tensor]:
    import clip_pacl

    return clip_pacl.load(path).state_dict()


def _assert_same_weights(a: Path, b: Path, atol: float = 2e-5) -> None:
    """Every weight within `atol`, except the attention key biases, within 5 x `atol`: their true gradient is exactly
    zero (a key bias adds the same score to every key of a query: softmax ignores it), so what they get is float
    noise, summed in another order by 2 ranks, and Adam turns noise into steps of up to lr (seen: 2.1e-5 after 6
    steps). A broken gather or a wrong offset moves every other weight by far more."""
    sa, sb = _state(a), _state(b)
    for name in sa:
        if name.endswith("attn.in_proj_bias"):
            q, k, v = sa[name].chunk(3)
            q_ref, k_ref, v_ref = sb[name].chunk(3)
            assert torch.allclose(torch.cat([q, v]), torch.cat([q_ref, v_ref]), atol=atol), name
            assert torch.allclose(k, k_ref, atol=5 * atol), f"{name} (keys)"
        else:
            assert torch.allclose(sa[name], sb[name], atol=atol), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The data, the initial weights every run starts from, and one process's run with batch 16 (2 x 8)."""
    import clip_pacl
    from clip_pacl.data.synthetic import generate_synthetic
    from clip_pacl_app.cli.main import main

    runs = tmp_path_factory.mktemp("runs")
    generate_synthetic(runs / "data", 32, seed=0, image_size=64)
    torch.manual_seed(123)
    clip_pacl.save(clip_pacl.load("tiny"), runs / "init")
    assert main(["train", *_train_args(runs, "--batch-size", "16", "--out", str(runs / "single"))]) == 0
    return runs


@pytest.mark.timeout(600)  # (includes the module's single-process run)
def test_torchrun_two_processes_train_like_one_with_the_same_global_batch(runs, tmp_path):
    """`torchrun --nproc-per-node 2 -m clip_pacl_app train` (gloo, CPU) ends with the weights of 1 process, batch 2B."""
    proc = _torchrun(runs, tmp_path / "ddp")
    assert proc.wait(500) == 0, proc.stderr.read()[-3000:]
    reports = re.findall(r"trained \d+ steps in", proc.stderr.read())
    assert len(reports) == 1, reports  # rank 0 reports the run, rank 1 stays quiet
    _assert_same_weights(tmp_path / "ddp" / "final", runs / "single" / "final")
    start, trained = _state(runs / "init"), _state(runs / "single" / "final")
    assert max(float((trained[n] - start[n]).abs().max()) for n in start) > 1e-3  # training moved the weights
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (runs / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ddp_log] == pytest.approx([r["loss"] for r in single_log], abs=1e-4)


def _local_loss_worker(rank, port, runs, out, shapes):
    """One rank of a 2-process run through `clip_pacl.train.train`, recording the logits the loss sees."""
    import clip_pacl.losses.distributed as distributed
    import clip_pacl.losses.objective as objective
    from clip_pacl_app.cli.main import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    real = objective.softmax_contrastive_loss

    def recording(logits_per_image, logits_per_text, offset=0, *masks):
        shapes[rank] = [*shapes.get(rank, []), (tuple(logits_per_image.shape), offset)]
        return real(logits_per_image, logits_per_text, offset, *masks)

    objective.softmax_contrastive_loss = recording

    def no_host_sync(*args):
        raise AssertionError("the training loop gathered without its capacity: a row-count host sync every step")

    distributed._largest_row_count = no_host_sync
    assert main(["train", *_train_args(runs, "--batch-size", "8", "--out", str(out), "--local-loss")]) == 0


@pytest.mark.timeout(600)  # (includes the module's single-process run)
def test_local_loss_through_the_training_loop_scores_local_rows_and_trains_like_one_process(runs, tmp_path):
    """--local-loss on 2 ranks: each scores its 8 rows against all 16 (offset = its place), ending as 1 process."""
    shapes = mp.Manager().dict()
    mp.spawn(_local_loss_worker, args=(_free_port(), runs, tmp_path / "local", shapes), nprocs=WORLD, join=True)
    assert set(shapes[0]) == {((8, 16), 0)} and set(shapes[1]) == {((8, 16), 8)}
    _assert_same_weights(tmp_path / "local" / "final", runs / "single" / "final")


@pytest.mark.timeout(600)  # (includes the module's single-process run)
def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc), parents first."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return tree


def test_torchrun_sigkill_then_resume_auto_is_the_same_run(runs, tmp_path):
    """Both ranks SIGKILLed after a checkpoint, then `torchrun ... --resume auto`: the run ends as if never stopped.

    Checkpoints every 3 steps with 2 steps an epoch: the one at step 3 is mid-epoch, so the resumed run must also
    restore its position inside the epoch (with --save-every 2 every checkpoint fell on an epoch's end)."""
    import signal
    import time

    from clip_pacl.train import checkpointing

    out = tmp_path / "ddp"
    proc = _torchrun(runs, out, "--save-every", "3", start_new_session=True)
    deadline = time.monotonic() + 500
    while checkpointing.latest_checkpoint(out) is None:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for pid in _process_tree(proc.pid):  # the launcher and both ranks, as when a node dies (the ranks may run in
        os.kill(pid, signal.SIGKILL)   # sessions of their own, which a killpg of the launcher's group would miss)
    proc.wait(30)
    assert int(checkpointing.latest_checkpoint(out).name.split("_")[1]) == 3  # mid-epoch
    resumed = _torchrun(runs, out, "--save-every", "3", "--resume", "auto")
    assert resumed.wait(500) == 0, resumed.stderr.read()[-3000:]
    err = resumed.stderr.read()
    assert "resuming from" in err and "(step 3/" in err  # from the mid-epoch checkpoint, not a finished run
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TRAIN_STEPS + 1))
    _assert_same_weights(out / "final", runs / "single" / "final")


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
