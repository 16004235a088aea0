"""The demo's evaluations on its held-out images, each through the library function the CLI uses, with its figure.

Figures go to OUT/figures/ (report.md links them, report.html inlines them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ZEROSHOT_TEMPLATES = ("a photo of a {}.",)


def evaluate_clip(clip: torch.nn.Module, test_dir: Path, out: Path, progress: bool) -> dict[str, Any]:
    """Zero-shot shape and colour classification (with confusion matrices), text<->image retrieval (with the grid
    of the first queries' top-5 images), CLIPScore of matched vs mismatched pairs, and OUT/index of the images."""
    from clip_pacl.data import read_caption_rows, read_label_rows
    from clip_pacl.retrieval.evaluate import evaluate_retrieval
    from clip_pacl.zeroshot.evaluate import evaluate_zeroshot

    figures = out / "figures"
    zeroshot = {}
    for task in ("shapes", "colors"):
        rows = read_label_rows(test_dir / f"{task}.csv")
        res = evaluate_zeroshot(clip, rows, ZEROSHOT_TEMPLATES, progress=progress, plots=figures / task)
        plot = Path(res["plots"][0]).replace(figures / f"confusion_{task}.png")
        (figures / task).rmdir()
        zeroshot[task] = {"top1": res["top1"], "top5": res["top5"], "top5_k": res["top5_k"],
                          "mean_per_class_recall": res["mean_per_class_recall"], "chance": 1 / res["num_classes"],
                          "n_images": res["num_images"], "plot": str(plot)}
    caption_rows = read_caption_rows(test_dir / "captions.csv")
    retrieval = evaluate_retrieval(clip, caption_rows, progress=progress, plots=figures)
    return {"zeroshot": zeroshot, "retrieval": retrieval, "clip_score": matched_vs_mismatched(clip, caption_rows),
            "index": build_demo_index(clip, test_dir, out, progress)}


def matched_vs_mismatched(model: torch.nn.Module, rows) -> dict[str, Any]:
    """Mean CLIPScore of each held-out image with its own caption and with the next image's caption, and how
    often its own scores higher: a model that learned nothing scores both alike."""
    from clip_pacl.metrics import clip_score
    from clip_pacl.retrieval.evaluate import group_captions

    images, captions, owner = group_captions(rows)
    first_caption = {}
    for caption, image in zip(captions, owner):
        first_caption.setdefault(image, caption)
    own = [first_caption[i] for i in range(len(images))]
    other = own[1:] + own[:1]  # each image with the caption of the next one
    scores = clip_score(model, images + images, own + other)
    n = len(images)
    by_pair = dict(zip(scores.pairs.tolist(), scores.clip_score.tolist()))
    both = [i for i in range(n) if i in by_pair and i + n in by_pair]
    matched = [by_pair[i] for i in both]
    mismatched = [by_pair[i + n] for i in both]
    return {"matched": sum(matched) / len(both), "mismatched": sum(mismatched) / len(both),
            "matched_higher": sum(m > x for m, x in zip(matched, mismatched)) / len(both), "n_images": len(both)}


def build_demo_index(model: torch.nn.Module, test_dir: Path, out: Path, progress: bool) -> str:
    """OUT/index: the held-out images embedded by the CLIP, as `clip-pacl index build --model OUT/clip` makes it,
    for `clip-pacl search` and `clip-pacl serve`."""
    from clip_pacl.retrieval.build import build_index, image_paths

    images = test_dir / "images"
    index, _ = build_index(model, image_paths(images, "image"), model_source=str(out / "clip"), progress=progress,
                           images={"source": str(images.resolve()), "image_key": "image"})
    return str(index.save(out / "index"))


def evaluate_segmentation_methods(clip: torch.nn.Module, pacl: torch.nn.Module, test_dir: Path, out: Path,
                                  cfg) -> dict[str, Any]:
    """mIoU of raw patches, MaskCLIP and PACL on the held-out masks labelled by colour and by shape, each at every
    background threshold of `cfg` and the label-free default; the figure and the overlay with the label-free rule."""
    from clip_pacl.segmentation.evaluate import evaluate_segmentation_thresholds

    thresholds = list(cfg.background_thresholds)
    seg: dict[str, Any] = {}
    for labels in ("segmentation_colors", "segmentation"):
        per_method = {}
        for name, model in (("patch", clip), ("maskclip", clip), ("pacl", pacl)):
            *results, auto = evaluate_segmentation_thresholds(model, test_dir / labels, [*thresholds, "auto"],
                                                              method=name, progress=cfg.progress)
            sweep = [{"background_threshold": r["background_threshold"], "miou": r["miou"],
                      "pixel_accuracy": r["pixel_accuracy"]} for r in results]
            per_method[name] = {"best": max(sweep, key=lambda r: r["miou"]), "sweep": sweep,
                                "auto": {"background": auto["background"]["rule"], "miou": auto["miou"],
                                         "pixel_accuracy": auto["pixel_accuracy"]}}
        seg[labels] = per_method
    data = test_dir / "segmentation_colors"
    overlay, rule = _overlay(pacl, data, out / "pacl_overlay.png")
    return {"segmentation": seg, "segmentation_figure": str(_figure(clip, pacl, data, cfg.figure_images,
                                                                     out / "figures")),
            "overlay": str(overlay), "overlay_background": rule}


def first_segmentation_image(data: Path) -> Path:
    """The held-out image the overlay shows and the printed `clip-pacl segment` command names."""
    return sorted((data / "images").iterdir())[0]


def _figure(clip, pacl, data: Path, n_images: int, figures: Path) -> Path:
    """Image | ground truth | raw patches | MaskCLIP | PACL for the first held-out images, each method with its
    label-free background rule: the rule of the headline ratio and of `clip-pacl segment` (no threshold tuned on
    the test labels)."""
    from clip_pacl.data.segmentation import open_segmentation_dataset
    from clip_pacl.segmentation.evaluate import dataset_templates
    from clip_pacl.segmentation.figure import FigureColumn, comparison_figure

    dataset = open_segmentation_dataset(data)
    columns = [FigureColumn("CLIP patches", clip, "patch"), FigureColumn("MaskCLIP", clip, "maskclip"),
               FigureColumn("PACL", pacl, "pacl")]
    figure = comparison_figure(dataset, range(min(n_images, len(dataset))), columns, dataset_templates(data))
    path = figures / "segmentation.png"
    figure.save(path)
    return path


def _overlay(model, seg_data: Path, path: Path) -> tuple[Path, str]:
    """The overlay `clip-pacl segment --overlay` draws for the first held-out image with the printed command (its
    default background rule, the dataset's templates, labels by tiles); returns (path, the rule's name)."""
    from clip_pacl.data.images import load_image
    from clip_pacl.segmentation.evaluate import dataset_templates
    from clip_pacl.segmentation.overlay import overlay_image
    from clip_pacl.segmentation.predict import segment
    from clip_pacl.zeroshot.templates import resolve_class_names

    classes = resolve_class_names(str(seg_data / "classes.txt"))
    image = load_image(first_segmentation_image(seg_data))
    result = segment(model, image, classes, templates=dataset_templates(seg_data), keep_scores=False)
    overlay_image(image, result.label_map, classes, result.fractions()).save(path)
    return path, result.background.name
