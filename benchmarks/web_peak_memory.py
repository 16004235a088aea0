"""Peak resident memory of `clip-pacl serve` for the largest requests it accepts.

Starts the server as its own process, then sends, one at a time: a small warm-up request, and the worst
accepted uploads: a square image of MAX_UPLOAD_PIXELS and one at the MAX_ASPECT_RATIO bound, each with
MAX_LABELS labels and as many templates as the prompt cap allows (`web/limits.py`), to /api/segment and
/api/classify. After each, the server's
VmHWM (peak RSS, Linux) is read. One JSON line per request goes to benchmarks/results/web_peak_memory.jsonl.

    python benchmarks/web_peak_memory.py --model tiny
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from clip_pacl.data.images import MAX_ASPECT_RATIO  # noqa: E402
from clip_pacl_app.web.limits import Limits  # noqa: E402
from clip_pacl_app.web.service import MAX_LABELS, MAX_TEMPLATES, MAX_UPLOAD_PIXELS  # noqa: E402
from webserver import HEADERS, rss_bytes, serve_process  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_jsonl  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "web_peak_memory.jsonl"


def picture(width: int, height: int) -> bytes:
    """A PNG with a few shapes (compresses to well under the 10 MB upload cap, decodes to width x height)."""
    image = Image.new("RGB", (width, height), (30, 90, 160))
    draw = ImageDraw.Draw(image)
    for i in range(8):
        x, y = width * i // 8, height * i // 8
        draw.ellipse((x, y, x + width // 6, y + height // 6), fill=(200, 40 * i, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    side = math.isqrt(MAX_UPLOAD_PIXELS)
    narrow = math.isqrt(MAX_UPLOAD_PIXELS // MAX_ASPECT_RATIO)
    uploads = {"square": (side, side), "wide": (narrow * MAX_ASPECT_RATIO, narrow)}
    labels = ",".join(f"object number {i}" for i in range(MAX_LABELS))
    n_templates = min(MAX_TEMPLATES, Limits().max_prompts // MAX_LABELS)
    templates = "\n".join(f"a photo {i} of a {{}}." for i in range(n_templates))
    with serve_process("--model", args.model) as (url, proc), httpx.Client(base_url=url, timeout=3600,
                                                                           headers=HEADERS) as client:
        warm = client.post("/api/classify", data={"labels": "a,b"}, files={"image": ("w.png", picture(64, 64))})
        records = [{"request": "warm-up classify 64x64, 2 labels", "status": warm.status_code}]
        records[0]["peak_rss_mb"] = rss_bytes(proc.pid, "VmHWM") / 2**20
        for name, (width, height) in uploads.items():
            data = picture(width, height)
            for endpoint in ("/api/segment", "/api/classify"):
                start = time.perf_counter()
                response = client.post(endpoint, data={"labels": labels, "templates": templates},
                                       files={"image": (f"{name}.png", data)})
                records.append({"request": f"{endpoint} {width}x{height} ({len(data) / 2**20:.2f} MB PNG), "
                                           f"{MAX_LABELS} labels x {n_templates} templates",
                                "status": response.status_code, "seconds": round(time.perf_counter() - start, 1),
                                "peak_rss_mb": rss_bytes(proc.pid, "VmHWM") / 2**20})
    RESULTS.parent.mkdir(exist_ok=True)
    records = [{"model": args.model, **record, "peak_rss_mb": round(record["peak_rss_mb"], 1)} for record in records]
    for record in records:
        print(json.dumps(record))
    append_jsonl(RESULTS, records)


if __name__ == "__main__":
    main()
