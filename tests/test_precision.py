"""`--precision` resolution (`clip_pacl.device`) and where benchmarks say they ran."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from clip_pacl import device as dev
from clip_pacl.errors import ConfigError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx2", "fma"})
    assert dev.resolve_precision("auto", "cpu") == "fp32"
    for flag in ("amx_bf16", "avx512_bf16"):
        monkeypatch.setattr(dev, "cpu_flags", lambda flag=flag: {"avx2", flag})
        assert dev.resolve_precision("auto", "cpu") == "bf16"


def test_explicit_precisions_and_errors():
    assert dev.resolve_precision(None) == "fp32"
    assert dev.resolve_precision("fp32", "cpu") == "fp32"
    assert dev.resolve_precision("bf16", "cpu") == "bf16"  # runs anywhere PyTorch has bf16 kernels, even slowly
    assert dev.precision_dtype("bf16") is torch.bfloat16
    with pytest.raises(ConfigError, match="fp32, bf16, auto"):
        dev.resolve_precision("fp16x")


def test_cpu_flags_read_from_linux():
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = dev.cpu_flags()
    assert flags and all(isinstance(f, str) for f in flags)


def test_machine_info_says_where_it_ran():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import machine
    finally:
        sys.path.remove(str(BENCHMARKS))
    info = machine.with_machine({"x": 1, "threads": 7})
    assert info["x"] == 1 and info["threads"] == 7  # the record's own fields win
    for key in ("cpu", "cpu_flags", "cpu_capability", "load_avg_1m", "torch"):
        assert key in info
    assert set(info["cpu_flags"]) <= set(machine.FLAGS_THAT_MATTER)


def test_every_benchmark_record_carries_the_machine():
    """A benchmark that appends JSONL does it through machine.py (`append_jsonl`, `with_machine`, `machine_info`),
    so every row names the CPU, its flags, threads and load."""
    for path in sorted(BENCHMARKS.glob("*.py")):
        source = path.read_text()
        writes = "results" in source and ('open(' in source and '"a"' in source or "append_jsonl" in source)
        if path.name == "machine.py" or not writes:
            continue
        names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
        assert names & {"append_jsonl", "with_machine", "machine_info"}, f"{path.name} writes rows without the machine"
