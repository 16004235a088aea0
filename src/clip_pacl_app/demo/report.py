"""The demo's report: one table of every metric, the figures, and the commands to go further.

`report.html` is self-contained (figures inlined as base64 PNG, no external resources: it can be mailed or opened
offline); `report.md` links the same PNGs in `figures/` beside it. The CLI prints the same table.
"""

from __future__ import annotations

import base64
import html
import math
import shlex
import shutil
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

SECTIONS = ("Training", "Zero-shot classification", "Retrieval", "CLIPScore", "Segmentation", "Every metric",
            "Go further")
PHASES = {"data": "generating the data", "clip_train": "training the CLIP", "clip_eval": "evaluating the CLIP",
          "pacl_train": "training PACL", "segmentation": "segmentation", "report": "writing the report"}
METHODS = {"patch": "raw patches", "maskclip": "MaskCLIP", "pacl": "PACL"}
LABELLINGS = {"segmentation_colors": "by colour", "segmentation": "by shape"}
# TrainConfig fields the printed training commands leave out: the demo's own validation and display choices
# (workers: each machine picks its own by default)
NOT_PRINTED = frozenset({"data", "model", "out", "progress", "val_data", "val_every", "device", "workers"})
FINETUNE_EPOCHS = 10  # the printed fine-tune: passes over the user's captions
FINETUNE_LR_DIVISOR = 10  # ... at this fraction of the demo's learning rate: the weights are trained already


def metric_rows(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, what to compare it with) for every number the demo measured, in the report's order."""
    ct, pt, zs, ret, cs = s["clip_train"], s["pacl_train"], s["zeroshot"], s["retrieval"], s["clip_score"]
    cfg = s["config"]
    rows = [("precision", s["precision"], precision_note(cfg["precision"], s["precision"])),
            ("CLIP training loss (last logged)", _f(ct["final_loss"]),
             f"{ct['steps']} steps; a model that guesses: ln {cfg['batch_size']} = {math.log(cfg['batch_size']):.3f}")]
    for task, name in (("shapes", "shape"), ("colors", "colour")):
        z = zs[task]
        rows += [(f"zero-shot {name} top-1", _f(z["top1"]), f"chance {z['chance']:.3f}, {z['n_images']} images"),
                 (f"zero-shot {name} top-{z['top5_k']}", _f(z["top5"]), f"chance {z['top5_k'] * z['chance']:.3f}"),
                 (f"zero-shot {name} mean per-class recall", _f(z["mean_per_class_recall"]),
                  f"chance {z['chance']:.3f}")]
    for way, n in (("text_to_image", ret["num_images"]), ("image_to_text", ret["num_captions"])):
        for k in (1, 5, 10):
            rows.append((f"retrieval {way.replace('_to_', '->')} R@{k}", _f(ret[f"{way}_R@{k}"]),
                         f"chance {min(k / n, 1):.3f} ({n} candidates)"))
    rows += [("CLIPScore, each image with its own caption", _f(cs["matched"]),
              f"with another image's caption: {cs['mismatched']:.3f}"),
             ("CLIPScore: own caption scores higher", f"{cs['matched_higher']:.1%}",
              f"chance 50%, {cs['n_images']} images"),
             ("PACL training loss (last logged)", _f(pt["final_loss"]),
              f"{pt['steps']} steps; a model that guesses: ln {cfg['pacl_batch_size']} = "
              f"{math.log(cfg['pacl_batch_size']):.3f}")]
    for labels, title in LABELLINGS.items():
        methods = s["segmentation"][labels]
        for method, name in METHODS.items():
            best, auto = methods[method]["best"], methods[method]["auto"]
            threshold = "prompt" if best["background_threshold"] is None else best["background_threshold"]
            rows.append((f"segmentation mIoU {title}, {name}", _f(best["miou"]),
                         f"background threshold {threshold}, pixel accuracy {best['pixel_accuracy']:.3f}; "
                         f"label-free background ({auto['background']}): {auto['miou']:.3f}"))
        baseline = max(methods["patch"]["best"]["miou"], methods["maskclip"]["best"]["miou"])
        if baseline > 0:
            rows.append((f"segmentation mIoU {title}, PACL / the better baseline",
                         f"{methods['pacl']['best']['miou'] / baseline:.2f}x",
                         "each at its best threshold on these labels; 1.00x: no better"))
        label_free = max(methods["patch"]["auto"]["miou"], methods["maskclip"]["auto"]["miou"])
        if label_free > 0:
            rows.append((f"segmentation mIoU {title}, PACL / the better baseline, label-free",
                         f"{methods['pacl']['auto']['miou'] / label_free:.2f}x",
                         "each with its label-free background rule (no threshold tuned on labels)"))
    for phase, times in s["phases"].items():
        rows.append((f"time: {PHASES.get(phase, phase)}", f"{times['seconds']:.1f} s",
                     f"CPU {times['cpu_seconds']:.1f} s"))
    rows.append(("time: total", f"{s['seconds']:.1f} s", f"{cfg['clip_steps']} CLIP + {cfg['pacl_steps']} PACL steps"))
    return rows


def precision_note(asked: str, ran: str) -> str:
    """Why the demo ran at `ran`: asked for it, or what `auto` found on this machine."""
    if asked != "auto":
        return f"asked for with --precision {asked}"
    units = "bfloat16 matrix units (AMX or AVX-512 BF16 on the CPU, or a bf16 GPU)"
    return f"auto: {units} found" if ran == "bf16" else f"auto: no {units}, so fp32"


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def format_table(rows: list[tuple[str, str, str]]) -> str:
    """The rows as aligned plain text."""
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


def format_summary(s: dict[str, Any]) -> str:
    """What `clip-pacl demo` prints: the metric table, where the report is, and the commands to go further."""
    lines = [f"precision {s['precision']}, {s['clip_train']['steps']} CLIP + {s['pacl_train']['steps']} PACL "
             f"training steps", "", format_table(metric_rows(s)), ""]
    if "report" in s:
        lines += [f"report: {s['report']['html']}  (and {s['report']['md']}, figures in "
                  f"{Path(s['report']['md']).parent / 'figures'})", ""]
    lines.append("go further:")
    for step in s["next_steps"]:
        lines += [f"  # {step['what']}", f"  {step['command']}"]
    return "\n".join(lines)


def train_command(config, **values: str) -> str:
    """The `clip-pacl train` command line of a TrainConfig: every option that differs from the default, with
    `values` (data=..., out=...) in place of the config's own."""
    from clip_pacl.train.config import pacl_flag, train_defaults

    defaults = train_defaults()
    args = ["clip-pacl", "train"]
    for name in ("data", "model", "out"):
        args += [f"--{name}", str(values.get(name, getattr(config, name)))]
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name == "pacl":  # the PACL options the config sets, each by its flag
            args += [item for key, v in value.items() for item in (pacl_flag(key), str(v))]
        if f.name in NOT_PRINTED or f.name == "pacl" or value == defaults[f.name]:
            continue
        flag = "--" + f.name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return shlex.join(args)


def next_steps(out: Path, test_dir: Path, clip_config, pacl_config) -> list[dict[str, str]]:
    """What to try next, each with its exact command."""
    from clip_pacl_app.demo.evaluate import first_segmentation_image

    seg = test_dir / "segmentation_colors"
    finetune = replace(clip_config, steps=None, epochs=FINETUNE_EPOCHS, lr=clip_config.lr / FINETUNE_LR_DIVISOR)
    csv = ("a CSV with columns image,caption (or open_clip's filepath,title, or image_path,text); image paths "
           "relative to the CSV; a few dozen pairs are enough to start, the batch shrinks to fit")
    return [
        {"what": "search the held-out images by text in a browser (with the CLIP that indexed them); classify and "
                 "segment your own images with PACL",
         "command": shlex.join(["clip-pacl", "serve", "--model", str(out / "pacl"), "--index", str(out / "index")])},
        {"what": "search from the command line",
         "command": shlex.join(["clip-pacl", "search", str(out / "index"), "a red circle", "-k", "5"])},
        {"what": "segment an image by colour names with PACL (the report's overlay is this command's)",
         "command": shlex.join(["clip-pacl", "segment", "--model", str(out / "pacl"),
                                str(first_segmentation_image(seg)), "--classes", str(seg / "classes.txt"),
                                "--templates", str(seg / "templates.txt"), "--out", "mask.png", "--overlay",
                                "overlay.png"])},
        {"what": f"fine-tune the demo's CLIP on your own captions ({csv}): it starts from the trained weights, "
                 f"at 1/{FINETUNE_LR_DIVISOR} of the learning rate, for {FINETUNE_EPOCHS} passes over your data",
         "command": train_command(finetune, data="YOUR.csv", model=str(out / "clip"), out="runs/clip-finetune")},
        {"what": "or train the same CLIP from scratch on your own captions (the same CSV; this needs thousands "
                 "of pairs)",
         "command": train_command(clip_config, data="YOUR.csv", out="runs/clip")},
        {"what": "then PACL on it",
         "command": train_command(pacl_config, data="YOUR.csv", model="runs/clip", out="runs/pacl")},
    ]


def write_report(s: dict[str, Any], out: Path) -> dict[str, Path]:
    """OUT/report.html (figures inlined) and OUT/report.md (figures linked in OUT/figures/)."""
    figures = out / "figures"
    for run, name in (("clip_train", "clip_loss.png"), ("pacl_train", "pacl_loss.png")):
        shutil.copyfile(Path(s[run]["run_dir"]) / "loss.png", figures / name)
    blocks = _blocks(s, figures)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(_markdown(blocks, out))
    html_path.write_text(_html(blocks))
    return {"html": html_path, "md": md_path}


def _blocks(s: dict[str, Any], figures: Path) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The report as (section, [(kind, content)]) with kinds "text", "image" (path, caption), "table", "commands"."""
    ct, pt, zs, ret, cs = s["clip_train"], s["pacl_train"], s["zeroshot"], s["retrieval"], s["clip_score"]
    colour = s["segmentation"]["segmentation_colors"]
    best = {m: colour[m]["best"]["miou"] for m in METHODS}
    auto = {m: colour[m]["auto"]["miou"] for m in METHODS}
    rule = colour["pacl"]["auto"]["background"]
    return [
        ("Training", [
            ("text", f"A '{s['config']['preset']}' CLIP trained from scratch for {ct['steps']} steps on "
                     f"{s['config']['n_train']} synthetic images with two captions each, then PACL's embedders on "
                     f"the frozen CLIP for {pt['steps']} steps (captions only, no masks), at {s['precision']} "
                     f"precision ({precision_note(s['config']['precision'], s['precision'])}; the evaluations "
                     f"ran at it too). Held-out text->image R@1 is measured during CLIP training."),
            ("image", (figures / "clip_loss.png", "CLIP: training loss and held-out text->image R@1")),
            ("image", (figures / "pacl_loss.png", "PACL: training loss"))]),
        ("Zero-shot classification", [
            ("text", f"Each of {zs['shapes']['n_images']} held-out images classified by the prompt 'a photo of a "
                     f"{{class}}.': shape top-1 {zs['shapes']['top1']:.3f}, colour top-1 {zs['colors']['top1']:.3f} "
                     f"(chance {zs['shapes']['chance']:.3f} for each)."),
            ("image", (Path(zs["shapes"]["plot"]), "confusion matrix, shapes")),
            ("image", (Path(zs["colors"]["plot"]), "confusion matrix, colours"))]),
        ("Retrieval", [
            ("text", f"Text->image R@1 {ret['text_to_image_R@1']:.3f}, R@5 {ret['text_to_image_R@5']:.3f} among "
                     f"{ret['num_images']} held-out images. Each row: a caption and its top-5 images, framed green "
                     f"where the image is the caption's own."),
            ("image", (Path(ret["plots"][0]), "text queries with their top-5 images"))]),
        ("CLIPScore", [
            ("text", f"CLIPScore (clip_pacl.metrics.clip_score) of the {cs['n_images']} held-out images: "
                     f"{cs['matched']:.3f} with their own captions, {cs['mismatched']:.3f} with the next image's "
                     f"caption; the own caption scores higher for {cs['matched_higher']:.1%} of the images "
                     f"(50% for a model that learned nothing).")]),
        ("Segmentation", [
            ("text", f"Held-out images segmented by colour names alone, each method with the label-free background "
                     f"rule that `clip-pacl segment` uses by default ({rule}; nothing tuned on the test labels): "
                     f"raw patches mIoU {auto['patch']:.3f}, MaskCLIP {auto['maskclip']:.3f}, PACL "
                     f"{auto['pacl']:.3f}. With the threshold that is best on these labels (a user has none): "
                     f"{best['patch']:.3f}, {best['maskclip']:.3f} and {best['pacl']:.3f}."),
            ("image", (Path(s["segmentation_figure"]), f"image, ground truth, raw patches, MaskCLIP, PACL, each with "
                                                       f"its label-free background rule ({rule})")),
            ("image", (Path(s["overlay"]), f"PACL's segmentation of the first image, drawn by the `clip-pacl segment "
                                           f"--overlay` command under Go further (background: "
                                           f"{s['overlay_background']})"))]),
        ("Every metric", [("table", metric_rows(s))]),
        ("Go further", [("commands", s["next_steps"])]),
    ]


def _markdown(blocks, out: Path) -> str:
    lines = ["# clip-pacl demo report", ""]
    for section, items in blocks:
        lines += [f"## {section}", ""]
        for kind, content in items:
            if kind == "text":
                lines += [content, ""]
            elif kind == "image":
                path, caption = content
                lines += [f"![{caption}]({path.relative_to(out).as_posix()})", ""]
            elif kind == "table":
                lines += ["| metric | value | for comparison |", "|---|---:|---|"]
                lines += [f"| {a} | {b} | {c} |" for a, b, c in content] + [""]
            else:
                for step in content:
                    lines += [f"{step['what']}:", "", "```bash", step["command"], "```", ""]
    return "\n".join(lines)


def _html(blocks) -> str:
    e = html.escape
    body = []
    for section, items in blocks:
        body.append(f"<h2>{e(section)}</h2>")
        for kind, content in items:
            if kind == "text":
                body.append(f"<p>{e(content)}</p>")
            elif kind == "image":
                path, caption = content
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{e(caption)}</figcaption></figure>")
            elif kind == "table":
                body.append("<table><tr><th>metric</th><th>value</th><th>for comparison</th></tr>"
                            + "".join(f"<tr{' class=time' if a.startswith('time:') else ''}><td>{e(a)}</td>"
                                      f"<td class=num>{e(b)}</td><td>{e(c)}</td></tr>"
                                      for a, b, c in content) + "</table>")
            else:
                body += [f"<p>{e(step['what'])}:</p><pre>{e(step['command'])}</pre>" for step in content]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>clip-pacl demo report</title>\n<style>'
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;line-height:1.4}"
        "img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:90%}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
        "td.num{text-align:right;font-family:monospace;white-space:nowrap}tr.time td{white-space:nowrap}"
        "pre{background:#f4f4f4;padding:.6em;overflow-x:auto}"
        "</style></head>\n<body>\n<h1>clip-pacl demo report</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )
