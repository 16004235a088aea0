import json
import os
import subprocess
import sys
from pathlib import Path

# Subprocesses (the CLI, benchmark scripts) run one OpenMP thread unless told otherwise: on a loaded 2-core machine
# two spinning threads per process starve each other (benchmarks/patch_probe.py in test_benchmark_scripts: 95 s with
# one thread, over 10 minutes with two, at load 16), which made timeouts fire. In-process tests set their own below.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests are small: keep them deterministic and let the two CPU threads do the work.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; two threads spin against each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


QUICK_DEMO = "clip-pacl demo --quick --no-progress --json"


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> tuple[Path, dict]:
    """(demo_out, the printed summary) of `clip-pacl demo --quick` run as a user runs it: a real process in a fresh
    folder, with this environment's scripts first on PATH. The README's install command ends in it
    (tests/test_readme.py) and tests/test_demo.py checks what it wrote: one demo run serves both."""
    cwd = tmp_path_factory.mktemp("user")
    out = cwd / "demo_out"  # the default --out, spelled absolute so that the printed paths work from anywhere
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([*QUICK_DEMO.split(), "--out", str(out)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout)
