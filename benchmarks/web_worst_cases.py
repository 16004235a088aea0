"""Issue 21's worst cases against a real `clip-pacl serve` (tiny model), for one source tree or two side by side.

Cases: N parallel 6324 x 6324 16-bit greyscale PNG classify uploads (87 KB each, 40 MP), 8 parallel 6324 x 6324 RGB
PNG segment uploads, and 100 labels x 100 templates (10,000 prompts) with a 2-prompt classify sent 2 s later. For
each: the statuses and seconds, the server's resident memory at rest, its peak (VmHWM) and what it still holds
after (VmRSS). One JSON line per case goes to stdout and benchmarks/results/web_worst_cases.jsonl.

    python benchmarks/web_worst_cases.py --src old=/path/to/old/src new=src --cases upload,rgb,prompts
    python benchmarks/web_worst_cases.py --src new=src --cases prompts --serve-flags="--max-prompts 10000"
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_jsonl  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "web_worst_cases.jsonl"
HEADERS = {"X-Requested-With": "clip-pacl"}
SIDE = 6324  # 40 MP, just under the server's pixel cap
SETUP = """
import sys
from pathlib import Path
import torch, clip_pacl
from PIL import Image
from clip_pacl.retrieval import build_index, image_paths
root = Path(sys.argv[1]); (root / "imgs").mkdir()
for i in range(6):
    Image.new("RGB", (40, 40), (40 * i, 10, 200)).save(root / "imgs" / f"{i}.png")
torch.manual_seed(0); model = clip_pacl.load("tiny", random_weights=True); clip_pacl.save(model, root / "model")
build_index(model, image_paths(root / "imgs"), progress=False, model_source=str(root / "model"))[0].save(root / "idx")
"""


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def grey16() -> bytes:
    return png(np.tile((np.arange(SIDE) * 10 % 65535).astype(np.uint16), (SIDE, 1)))


def rgb() -> bytes:
    ramp = np.tile((np.arange(SIDE) % 256).astype(np.uint8), (SIDE, 1))
    return png(np.stack([ramp] * 3, axis=-1), "RGB")


SMALL = png(np.full((64, 64, 3), (200, 20, 20), dtype=np.uint8), "RGB")


class Server:
    """`clip-pacl serve` from source tree `src` over the tiny index in `root`."""

    def __init__(self, src: str, root: Path, flags: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "clip_pacl_app.cli.main", "serve", "--model", str(root / "model"),
                   "--index", str(root / "idx"), "--port", str(port), *flags]
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        while True:
            try:
                httpx.get(f"{self.url}/api/health", timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                time.sleep(0.3)
        self.post("/api/classify", {"labels": "a,b", "templates": "simple"}, SMALL)  # warm-up
        self.at_rest = self.memory("VmRSS")

    def post(self, endpoint: str, data: dict, image: bytes) -> tuple[int, float]:
        started = time.monotonic()
        response = httpx.post(f"{self.url}{endpoint}", headers=HEADERS, data=data, files={"image": ("x.png", image)},
                              timeout=1800)
        return response.status_code, round(time.monotonic() - started, 2)

    def memory(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024)
        raise KeyError(field)

    def parallel(self, n: int, endpoint: str, data: dict, image: bytes) -> dict:
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(lambda _: self.post(endpoint, data, image), range(n)))
        time.sleep(1)
        return {"answers": answers, "rss_at_rest_mb": self.at_rest, "peak_mb": self.memory("VmHWM"),
                "held_after_mb": self.memory("VmRSS")}

    def prompts_beside_small(self) -> dict:
        labels = ",".join(f"thing number {i}" for i in range(100))
        templates = "\n".join(f"a picture {j} of a {{}}." for j in range(100))
        big: list[tuple[int, float]] = []
        thread = threading.Thread(target=lambda: big.append(self.post(
            "/api/classify", {"labels": labels, "templates": templates}, SMALL)))
        thread.start()
        time.sleep(2)
        small = self.post("/api/classify", {"labels": "cat,dog", "templates": "a photo of a {}."}, SMALL)
        thread.join()
        return {"big": big[0], "small": small}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_case(server: Server, case: str, n: int) -> dict:
    if case == "upload":
        return {"case": f"{n} parallel {SIDE}x{SIDE} 16-bit PNG classify",
                **server.parallel(n, "/api/classify", {"labels": "a,b", "templates": "simple"}, grey16())}
    if case == "rgb":
        return {"case": f"8 parallel {SIDE}x{SIDE} RGB PNG segment",
                **server.parallel(8, "/api/segment", {"labels": "a,b"}, rgb())}
    return {"case": "100 labels x 100 templates, a 2-prompt classify 2 s later", **server.prompts_beside_small()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", nargs="+", required=True, metavar="NAME=SRC", help="source trees to compare")
    parser.add_argument("--cases", default="upload,rgb,prompts", help="comma-separated: upload, rgb, prompts")
    parser.add_argument("-n", type=int, default=4, help="parallel 16-bit uploads")
    parser.add_argument("--serve-flags", default="", help="more `clip-pacl serve` flags (for every tree)")
    args = parser.parse_args()
    RESULTS.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        first_src = args.src[0].split("=", 1)[1]
        subprocess.run([sys.executable, "-c", SETUP, tmp], check=True,
                       env={**os.environ, "PYTHONPATH": str(Path(first_src).resolve())})
        for named in args.src:
            name, src = named.split("=", 1)
            for case in args.cases.split(","):
                server = Server(src, Path(tmp), shlex.split(args.serve_flags))  # a fresh server: its own peak
                try:
                    record = {"tree": name, "serve_flags": args.serve_flags, **run_case(server, case, args.n)}
                finally:
                    server.close()
                print(json.dumps(record), flush=True)
                append_jsonl(RESULTS, [record])


if __name__ == "__main__":
    main()
