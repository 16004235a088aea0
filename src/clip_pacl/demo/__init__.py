"""The one-command walkthrough: synthetic data -> tiny CLIP -> zero-shot/retrieval -> PACL -> segmentation.

Everything runs on the built-in synthetic dataset, on CPU, in minutes, through the same library
functions the commands use; the result is a run directory a person can look at (summary, loss
curves, an overlay) and one summary dict for scripts.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clip_pacl.console import log


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo_out"
    n_train: int = 6000
    n_test: int = 600
    clip_steps: int = 1200
    pacl_steps: int = 400
    batch_size: int = 128
    pacl_batch_size: int = 256
    # PACL on a tiny CLIP: MaskCLIP value-path tokens (the last block's attention mixes every patch with the
    # whole image) and a sharp pooling softmax; the paper's (tokens, 1.0) suits large pretrained CLIPs.
    pacl_patch_tokens: str = "maskclip"
    pacl_pool_temperature: float = 0.05
    # every method is scored at each of these (None: background by its prompt) and reported at its best
    background_thresholds: tuple[float | None, ...] = (None, 0.2, 0.3, 0.4, 0.5)
    preset: str = "tiny"
    image_size: int = 64
    device: str | None = None
    seed: int = 0
    progress: bool = True

    @classmethod
    def quick(cls, out: str, **kw: Any) -> DemoConfig:
        """A seconds-long version for tests and smoke runs: same steps, tiny sizes."""
        return cls(out=out, n_train=64, n_test=24, clip_steps=4, pacl_steps=4, batch_size=16, pacl_batch_size=16, **kw)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    import clip_pacl
    from clip_pacl.data import read_caption_rows, read_label_rows
    from clip_pacl.data.synthetic import generate_synthetic
    from clip_pacl.eval.retrieval import evaluate_retrieval
    from clip_pacl.eval.segmentation import evaluate_segmentation_thresholds
    from clip_pacl.eval.zeroshot import evaluate_zeroshot
    from clip_pacl.train import TrainConfig, train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict[str, Any] = {"config": asdict(cfg)}

    log(f"[1/5] generating the synthetic dataset in {out / 'data'}")
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    generate_synthetic(train_dir, cfg.n_train, seed=cfg.seed, image_size=cfg.image_size, captions_per_image=2,
                       progress=cfg.progress)
    generate_synthetic(test_dir, cfg.n_test, seed=cfg.seed + 1_000_003, image_size=cfg.image_size,
                       progress=cfg.progress)

    log(f"[2/5] training a '{cfg.preset}' CLIP for {cfg.clip_steps} steps")
    clip_run = train(TrainConfig(
        data=str(train_dir / "captions.csv"), model=cfg.preset, out=str(out / "clip"), steps=cfg.clip_steps,
        batch_size=cfg.batch_size, lr=1e-3, warmup=min(100, cfg.clip_steps // 10), seed=cfg.seed, device=cfg.device,
        image_size=cfg.image_size, val_data=str(test_dir / "captions.csv"), progress=cfg.progress,
    ))
    summary["clip_train"] = {"steps": clip_run.steps, "seconds": round(clip_run.seconds, 1),
                             "final_loss": clip_run.final_loss, "model": clip_run.final_model}

    log("[3/5] evaluating the CLIP on held-out images")
    clip = clip_pacl.load(clip_run.final_model, device=cfg.device)
    zs = {}
    for task in ("shapes", "colors"):
        rows = read_label_rows(test_dir / f"{task}.csv")
        res = evaluate_zeroshot(clip, rows, ["a photo of a {}."], device=cfg.device, progress=cfg.progress)
        zs[task] = {"top1": res["top1"], "chance": 1 / res["num_classes"], "n_images": res["num_images"]}
    summary["zeroshot"] = zs
    ret = evaluate_retrieval(clip, read_caption_rows(test_dir / "captions.csv"), device=cfg.device,
                             progress=cfg.progress)
    summary["retrieval"] = ret

    log(f"[4/5] training PACL embedders on the frozen CLIP for {cfg.pacl_steps} steps (captions only, no masks)")
    pacl_run = train(TrainConfig(
        data=str(train_dir / "captions.csv"), model=clip_run.final_model, out=str(out / "pacl"),
        objective="pacl", cache_features=True, steps=cfg.pacl_steps, batch_size=cfg.pacl_batch_size, lr=1e-3,
        wd=0.01, warmup=min(50, cfg.pacl_steps // 10), seed=cfg.seed, device=cfg.device, progress=cfg.progress,
        pacl_patch_tokens=cfg.pacl_patch_tokens, pacl_pool_temperature=cfg.pacl_pool_temperature,
    ))
    summary["pacl_train"] = {"steps": pacl_run.steps, "seconds": round(pacl_run.seconds, 1),
                             "final_loss": pacl_run.final_loss, "model": pacl_run.final_model}

    log("[5/5] segmenting held-out images by class name (colours, then shapes): raw patches, MaskCLIP, PACL")
    pacl = clip_pacl.load(pacl_run.final_model, device=cfg.device)
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
                                "auto": {"background": auto["background"]["rule"], "miou": auto["miou"]}}
        seg[labels] = per_method
    summary["segmentation"] = seg
    best_pacl = seg["segmentation_colors"]["pacl"]["best"]["background_threshold"]
    summary["overlay"] = str(_overlay(pacl, test_dir / "segmentation_colors", out / "pacl_overlay.png", best_pacl))
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _overlay(model, seg_data: Path, path: Path, background_threshold: float | None) -> Path:
    """Overlay of the first held-out segmentation image, segmented by every class name."""
    from clip_pacl.data.segmentation import open_segmentation_dataset
    from clip_pacl.eval.segmentation import dataset_templates
    from clip_pacl.segmentation.overlay import overlay_image
    from clip_pacl.segmentation.predict import segment

    dataset = open_segmentation_dataset(seg_data)
    classes = list(dataset.class_names)
    image = dataset[0][0].convert("RGB")
    result = segment(model, image, classes, templates=dataset_templates(seg_data), method="pacl",
                     background_threshold=background_threshold)
    overlay_image(image, result.label_map, classes, fractions=result.fractions()).save(path)
    return path


def format_summary(s: dict[str, Any]) -> str:
    zs, ret, seg = s["zeroshot"], s["retrieval"], s["segmentation"]
    lines = [
        f"CLIP ({s['clip_train']['steps']} steps, {s['clip_train']['seconds']} s):",
        f"  zero-shot shape top-1  {zs['shapes']['top1']:.3f}  (chance {zs['shapes']['chance']:.3f})",
        f"  zero-shot colour top-1 {zs['colors']['top1']:.3f}  (chance {zs['colors']['chance']:.3f})",
        f"  text->image R@1 {ret['text_to_image_R@1']:.3f}   image->text R@1 {ret['image_to_text_R@1']:.3f}",
        f"PACL ({s['pacl_train']['steps']} steps, {s['pacl_train']['seconds']} s) segmentation mIoU, each method at "
        "its best background threshold:",
    ]
    for labels, title in (("segmentation_colors", "by colour"), ("segmentation", "by shape")):
        best = {method: result["best"] for method, result in seg[labels].items()}
        baseline = max(best["patch"]["miou"], best["maskclip"]["miou"])
        ratio = f"{best['pacl']['miou'] / baseline:.2f}x the better baseline" if baseline > 0 else ""
        lines.append(
            f"  {title}: raw patches {best['patch']['miou']:.3f} (threshold {best['patch']['background_threshold']}), "
            f"MaskCLIP {best['maskclip']['miou']:.3f} (threshold {best['maskclip']['background_threshold']}), "
            f"PACL {best['pacl']['miou']:.3f} (threshold {best['pacl']['background_threshold']})  {ratio}")
    lines.append("with the background found without labels (the default rule of segment / eval segmentation):")
    for labels, title in (("segmentation_colors", "by colour"), ("segmentation", "by shape")):
        auto = {method: result["auto"] for method, result in seg[labels].items()}
        lines.append(f"  {title}: raw patches {auto['patch']['miou']:.3f}, MaskCLIP {auto['maskclip']['miou']:.3f}, "
                     f"PACL {auto['pacl']['miou']:.3f} (rule {auto['pacl']['background']})")
    lines += [f"overlay: {s['overlay']}", f"total: {s['seconds']} s"]
    return "\n".join(lines)
