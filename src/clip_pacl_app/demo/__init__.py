"""The one-command walkthrough: synthetic data -> tiny CLIP -> zero-shot/retrieval -> PACL -> segmentation -> report.

Everything runs on the built-in synthetic dataset, on CPU, in minutes, through the same library functions the
commands use. The result is a run directory a person can look at (report.html, report.md and its figures, the
checkpoints, an image index) and one summary dict for scripts (summary.json).
"""

from clip_pacl_app.demo.pipeline import DemoConfig, prepare_out_dir, run_demo
from clip_pacl_app.demo.report import SECTIONS, format_summary, metric_rows

__all__ = ["SECTIONS", "DemoConfig", "format_summary", "metric_rows", "prepare_out_dir", "run_demo"]
