"""Image and text encoding throughput, clip-pacl vs open_clip, same weights, same inputs, one process.

For each model an open_clip model is created with random weights (BatchNorm statistics randomised so they matter),
its state dict is converted to ours, and both encode the same batch: a random image batch at the model's resolution,
or COCO-like captions (8-20 words, fixed seed) tokenized with context 77. Calls alternate between the libraries
(the order rotates), after warm-up; the median time per call gives images (or texts) per second. The outputs are
compared in the same run. With --int8 a third contender runs in the same rotation: clip-pacl with the model
int8-quantized (`clip_pacl.quantize_int8`), with its ratio to float32 clip-pacl and to open_clip and its cosine to the
float32 features.

Image rows also give the achieved rate in GFLOP/s of the model's nominal work (the plain forward's multiply-adds as
torch.utils.flop_counter counts them, attention included; our one-row last block does less and counts as speed) and
its share of the machine's float32 matmul peak, measured at the start of the run (2048^3 products by torch.mm and
by oneDNN, best of 7; the larger is the peak; int8 rows can pass 100%: int8 products are not float32 ones). On CPU
the same per second of the process's CPU time (`*_gflop_per_cpu_s`, `*_pct_of_cpu_peak` against the peak's own
`peak_gflop_per_cpu_s`): a shared machine's other jobs stretch wall time, and the peak measured in it, far more.
Each record also holds the median wall and CPU seconds per call of both libraries (`*_wall_s`, `*_cpu_s`).
--rss runs each library in a child process that builds only its own model and encodes the batch --repeats times,
and records its peak resident memory (ru_maxrss; on CUDA the allocator's peak, torch.cuda.max_memory_allocated).

--device cuda runs both libraries on the GPU (timers read after torch.cuda.synchronize; the peak is torch.mm at
8192^3); --amp bf16 encodes under torch.autocast(bfloat16) for both libraries (the peak is then bf16's).
--int8 is CPU only.

    python benchmarks/encode.py --models ViT-B-32,ViT-B-16 --towers image --batch 16 --threads 1 --repeats 7 --int8
    python benchmarks/encode.py --models ViT-B-32 --towers image,text --batch 16 --threads 2 --bf16
    python benchmarks/encode.py --models ViT-B-32 --towers image --batch 16 --threads 1 --rss
    python benchmarks/encode.py --device cuda --models ViT-B-32 --towers image,text --batch 1024 --repeats 10

One JSON object per measurement is appended to --out; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import logging
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from clip_pacl.checkpoint.io import set_precision
from clip_pacl.config import CLIPConfig
from clip_pacl.formats.convert_open_clip import from_open_clip
from clip_pacl.models import CLIP
from clip_pacl.models.quantize import quantize_int8
from clip_pacl.tokenizer import tokenize

sys.path.insert(0, str(Path(__file__).parent))
from machine import (  # noqa: E402
    current_rss_mb,
    device_or_exit,
    machine_info,
    matmul_peak,
    peak_memory_mib,
    peak_rss_mb,
    reset_peak_memory,
    run_child,
    synchronize,
)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16}

SUBJECTS = ["a man", "a woman", "two dogs", "a cat", "a child", "a group of people", "a red bus", "a small boat",
            "an old train", "a brown horse", "a plate of food", "a skateboarder", "a giraffe", "three birds"]
VERBS = ["sitting on", "standing next to", "riding", "walking along", "looking at", "playing with", "parked near",
         "flying over", "lying on", "eating"]
OBJECTS = ["a wooden bench", "the beach", "a busy city street", "a snowy mountain", "a kitchen table", "the river",
           "a green field", "a tall building", "a wave", "a pizza", "the park", "a train station"]
EXTRAS = ["at sunset", "on a sunny day", "in the rain", "with trees in the background", "while people watch",
          "in front of a large crowd", "under a blue sky", "next to a white fence", "at night"]


def coco_like_captions(n: int, seed: int = 0) -> list[str]:
    """Captions of roughly 8-20 words, like COCO's."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        for extra in rng.sample(EXTRAS, rng.randint(1, 2)):
            words += f" {extra}"
        captions.append(words[0].upper() + words[1:] + ".")
    return captions


def autocast(amp: str, device: torch.device):
    """A factory of the context both libraries run in: torch.autocast in bfloat16, or nothing."""
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=AMP_DTYPES[amp])


def open_clip_model(name: str) -> torch.nn.Module:
    """open_clip's model `name` with random weights, in eval mode; a clip-pacl preset that open_clip does not know
    (`tiny`, for quick runs) is built by open_clip from that preset's open_clip config."""
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)
    if name in open_clip.list_models():
        return open_clip.create_model(name).eval()
    cfg = CLIPConfig.from_name(name).to_open_clip_dict()
    return open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"],
                                quick_gelu=cfg["quick_gelu"]).eval()


def build_pair(name: str, device: torch.device = torch.device("cpu")) -> tuple[torch.nn.Module, CLIP]:
    """(open_clip model, our model) with identical weights, both in eval mode, on `device`."""
    torch.manual_seed(0)
    theirs = open_clip_model(name)
    for module in theirs.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_(1, 0.1)
    ours = CLIP(CLIPConfig.from_name(name))
    ours.load_state_dict(from_open_clip(theirs.state_dict()))
    return theirs.to(device), ours.eval().to(device)


def median_seconds(fns: dict, repeats: int, warmup: int, device: torch.device = torch.device("cpu")
                   ) -> dict[str, dict[str, float]]:
    """Median wall-clock and process CPU seconds per call of each function, calls rotating between them, each timed
    from and to an idle device. CPU time is reported too because the machine may be shared: other processes stretch
    wall time but barely change the CPU time our own threads need (on CUDA it counts the host's wait as well)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    wall: dict[str, list[float]] = {key: [] for key in names}
    cpu: dict[str, list[float]] = {key: [] for key in names}
    for r in range(repeats):
        for key in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fns[key]()
            synchronize(device)
            wall[key].append(time.perf_counter() - start_wall)
            cpu[key].append(time.process_time() - start_cpu)
    return {"wall": {k: statistics.median(v) for k, v in wall.items()},
            "cpu": {k: statistics.median(v) for k, v in cpu.items()}}


def attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU attention kernel, which torch.utils.flop_counter does not count by itself."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def counted_flops(fn) -> int:
    """FLOPs of `fn()` (no autograd) as torch.utils.flop_counter counts them, attention included on CPU and CUDA."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def nominal_gflops(model: CLIP, image: torch.Tensor) -> float:
    """GFLOPs of the plain image tower (the textbook forward) on one image."""
    return counted_flops(lambda: model.visual(image[:1])) / 1e9


def contenders(name: str, tower: str, batch: int, int8: bool, device: torch.device = torch.device("cpu"),
               amp: str = "none", bf16: bool = False):
    """(inputs, {contender: encode function}, our model): clip_pacl, open_clip, (with int8) clip_pacl_int8 and
    (with bf16) clip_pacl_bf16, a copy with bfloat16 towers (`--precision bf16`)."""
    theirs, ours = build_pair(name, device)
    context = autocast(amp, device)
    if tower == "image":
        size = ours.image_size
        inputs = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))  # (B, 3, H, W)
        encoders = {"clip_pacl": ours.encode_image, "open_clip": theirs.encode_image}
    else:
        inputs = tokenize(coco_like_captions(batch), context_length=ours.context_length)  # (B, 77)
        encoders = {"clip_pacl": ours.encode_text, "open_clip": theirs.encode_text}
    inputs = inputs.to(device)

    def run(encode):
        with context():
            return encode(inputs)

    fns = {key: functools.partial(run, encode) for key, encode in encoders.items()}
    if int8:
        quantized = quantize_int8(ours)
        encode = quantized.encode_image if tower == "image" else quantized.encode_text
        fns["clip_pacl_int8"] = lambda: encode(inputs)
    if bf16:
        half = set_precision(copy.deepcopy(ours), "bf16")
        encode_bf16 = half.encode_image if tower == "image" else half.encode_text
        fns["clip_pacl_bf16"] = lambda: encode_bf16(inputs)
    return inputs, fns, ours


def measure(name: str, tower: str, batch: int, repeats: int, warmup: int, int8: bool, peak: dict,
            device: torch.device = torch.device("cpu"), amp: str = "none", bf16: bool = False) -> dict:
    inputs, fns, ours = contenders(name, tower, batch, int8, device, amp, bf16)
    with torch.inference_mode():
        outputs = {key: fn().float() for key, fn in fns.items()}
        seconds = median_seconds(fns, repeats, warmup, device)
    wall, cpu = seconds["wall"], seconds["cpu"]
    record = {
        "model": name, "tower": tower, "batch": batch, "amp": amp,
        "ours_per_s": round(batch / wall["clip_pacl"], 2),
        "open_clip_per_s": round(batch / wall["open_clip"], 2),
        "ratio": round(wall["open_clip"] / wall["clip_pacl"], 3),
        "cpu_ratio": round(cpu["open_clip"] / cpu["clip_pacl"], 3),
        "ours_wall_s": round(wall["clip_pacl"], 4), "open_clip_wall_s": round(wall["open_clip"], 4),
        "ours_cpu_s": round(cpu["clip_pacl"], 4), "open_clip_cpu_s": round(cpu["open_clip"], 4),
        "max_abs_diff": float((outputs["clip_pacl"] - outputs["open_clip"]).abs().max()),
    }
    if int8:
        record.update({
            "int8_per_s": round(batch / wall["clip_pacl_int8"], 2),
            "int8_vs_fp32": round(wall["clip_pacl"] / wall["clip_pacl_int8"], 3),
            "int8_vs_fp32_cpu": round(cpu["clip_pacl"] / cpu["clip_pacl_int8"], 3),
            "int8_vs_open_clip": round(wall["open_clip"] / wall["clip_pacl_int8"], 3),
            "int8_cosine_min": round(float(F.cosine_similarity(outputs["clip_pacl_int8"], outputs["clip_pacl"]).min()),
                                     5),
        })
    if bf16:
        record.update({
            "bf16_per_s": round(batch / wall["clip_pacl_bf16"], 2),
            "bf16_vs_fp32": round(wall["clip_pacl"] / wall["clip_pacl_bf16"], 3),
            "bf16_vs_open_clip": round(wall["open_clip"] / wall["clip_pacl_bf16"], 3),
            "bf16_cosine_min": round(float(F.cosine_similarity(outputs["clip_pacl_bf16"], outputs["clip_pacl"]).min()),
                                     5),
        })
    if tower == "image":
        gflops = nominal_gflops(ours, inputs)
        record["gflops_per_image"] = round(gflops, 3)
        for key, short in (("clip_pacl", "ours"), ("open_clip", "open_clip"), ("clip_pacl_int8", "int8")):
            if key in wall:
                rate = gflops * batch / wall[key]
                record[f"{short}_gflop_s"] = round(rate, 1)
                record[f"{short}_pct_of_{peak_label(peak)}_peak"] = round(100 * rate / peak["peak_gflop_s"], 1)
                if "peak_gflop_per_cpu_s" in peak:
                    record[f"{short}_gflop_per_cpu_s"] = round(gflops * batch / cpu[key], 1)
                    record[f"{short}_pct_of_cpu_peak"] = round(100 * gflops * batch / cpu[key]
                                                               / peak["peak_gflop_per_cpu_s"], 1)
        record.update(peak)
    else:
        record["max_tokens"] = int(inputs.argmax(-1).max()) + 1
    return record


def peak_label(peak: dict) -> str:
    """"fp32" or "bf16": the dtype of the measured matmul peak, as the record's field names carry it."""
    return {"float32": "fp32", "bfloat16": "bf16"}[peak["peak_dtype"]]


# ---------------------------------------------------------------------------------------------- peak memory
def rss_child(library: str, name: str, batch: int, repeats: int, device: torch.device = torch.device("cpu"),
              amp: str = "none") -> dict:
    """In a child process: build one library's model, encode a batch `repeats` times, report memory (on CUDA also the
    allocator's peak, weights included)."""
    after_import = current_rss_mb()
    if library == "open_clip":
        model = open_clip_model(name)
    else:
        model = CLIP(CLIPConfig.from_name(name)).eval()
        if library == "clip_pacl_int8":
            model = quantize_int8(model, inplace=True)
    after_build = current_rss_mb()
    size = model.visual.image_size if library == "open_clip" else model.image_size
    size = size[0] if isinstance(size, tuple) else size
    reset_peak_memory(device)
    model.to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode(), autocast(amp, device)():
        for _ in range(repeats):
            model.encode_image(images)
    synchronize(device)
    memory = {"peak_cuda_mib": peak_memory_mib(device)} if device.type == "cuda" else {}
    return {"rss_after_import_mb": after_import, "rss_after_build_mb": after_build,
            "rss_after_encode_mb": current_rss_mb(), "peak_rss_mb": peak_rss_mb(), **memory}


def measure_rss(name: str, batch: int, repeats: int, threads: int, libraries: list[str], device: str = "cpu",
                amp: str = "none") -> list[dict]:
    records = []
    for library in libraries:
        child = run_child([__file__, "--rss-child", library, "--models", name, "--batch", str(batch),
                           "--repeats", str(repeats), "--threads", str(threads), "--device", device, "--amp", amp])
        records.append({"kind": "peak_rss", "model": name, "tower": "image", "batch": batch, "library": library,
                        "amp": amp, **child})
    return records


# ---------------------------------------------------------------------------------------------- output
def print_table(records: list[dict]) -> None:
    """Throughput rows, then memory rows, as aligned text."""
    speed = [r for r in records if r.get("kind") != "peak_rss"]
    if speed:
        print(f"{'model':<10} {'tower':<6} {'batch':>5} {'thr':>3} {'clip-pacl/s':>11} {'open_clip/s':>11} "
              f"{'ratio':>6} {'int8/s':>7} {'int8/fp32':>9} {'int8/oc':>7} {'cos':>7} {'GFLOP/s':>8} {'%peak':>6}")
        for r in speed:
            int8 = (f"{r['int8_per_s']:>7} {r['int8_vs_fp32']:>9} {r['int8_vs_open_clip']:>7} "
                    f"{r['int8_cosine_min']:>7}" if "int8_per_s" in r else f"{'':>7} {'':>9} {'':>7} {'':>7}")
            flops = (f"{r['ours_gflop_s']:>8} {r[f'ours_pct_of_{peak_label(r)}_peak']:>6} ({r['peak_dtype']})"
                     if "ours_gflop_s" in r else "")
            print(f"{r['model']:<10} {r['tower']:<6} {r['batch']:>5} {r['threads']:>3} {r['ours_per_s']:>11} "
                  f"{r['open_clip_per_s']:>11} {r['ratio']:>6} {int8} {flops}")
            if "bf16_per_s" in r:
                print(f"{'':<10} bf16: {r['bf16_per_s']}/s, {r['bf16_vs_fp32']}x fp32 clip-pacl, "
                      f"{r['bf16_vs_open_clip']}x open_clip, cosine to fp32 >= {r['bf16_cosine_min']}")
    for r in records:
        if r.get("kind") == "peak_rss":
            cuda = f", CUDA peak {r['peak_cuda_mib']} MiB" if "peak_cuda_mib" in r else ""
            print(f"peak RSS {r['model']} image batch {r['batch']}: {r['library']:<15} {r['peak_rss_mb']:>8} MiB "
                  f"(after import {r['rss_after_import_mb']}, after build {r['rss_after_build_mb']}{cuda})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B-32,RN50",
                        help="comma-separated open_clip model names (or clip-pacl presets such as tiny)")
    parser.add_argument("--towers", default="image,text", help="comma-separated: image, text")
    parser.add_argument("--batch", type=int, default=16, help="images (or texts) per call")
    parser.add_argument("--text-batch", type=int, default=None, help="texts per call (default: --batch)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every library")
    parser.add_argument("--peak-size", type=int, default=None, metavar="N",
                        help="side of the matrices that measure the matmul peak (default: 2048 on CPU, 8192 "
                             "on a GPU; smaller only for smoke runs: bf16 at 2048 takes minutes on a CPU "
                             "without bf16 units)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per library (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per library first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both libraries run")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="none",
                        help="bf16: both libraries encode under torch.autocast(bfloat16)")
    parser.add_argument("--bf16", action="store_true",
                        help="also time clip-pacl with bfloat16 towers (`--precision bf16`), against its float32")
    parser.add_argument("--int8", action="store_true",
                        help="also time clip-pacl with int8-quantized linear layers (CPU only)")
    parser.add_argument("--rss", action="store_true",
                        help="only measure peak memory of image encoding, one child process per library")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encode.jsonl",
                        help="JSONL file the measurements are appended to")
    args = parser.parse_args(argv)
    if args.int8 and args.device != "cpu":
        parser.error("--int8 is CPU only (PyTorch's dynamic int8 kernels have no CUDA implementation)")
    torch.set_num_threads(args.threads)
    device = device_or_exit(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, models[0], args.batch, args.repeats, device, args.amp)))
        return 0
    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    if unknown := set(towers) - {"image", "text"}:
        parser.error(f"unknown tower(s) {sorted(unknown)} (image, text)")
    common = {**machine_info(device), "repeats": args.repeats,
              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    records = []
    if args.rss:
        libraries = ["clip_pacl", "open_clip"] + (["clip_pacl_int8"] if args.int8 else [])
        records = [{**r, **common} for name in models
                   for r in measure_rss(name, args.batch, args.repeats, args.threads, libraries, args.device,
                                         args.amp)]
    else:
        peak = matmul_peak(device, AMP_DTYPES[args.amp] or torch.float32, size=args.peak_size) \
            if "image" in towers else {}
        for name in models:
            for tower in towers:
                batch = args.text_batch or args.batch if tower == "text" else args.batch
                record = {**measure(name, tower, batch, args.repeats, args.warmup, args.int8, peak, device, args.amp,
                                    args.bf16), **common}
                print(json.dumps(record), flush=True)
                records.append(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print_table(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
