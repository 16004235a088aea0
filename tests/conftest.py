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

# Tests are small: keep them deterministic and let the two CPU threads do the work. Under pytest-xdist (the README's
# test command runs `-n auto`) each of the N worker processes gets its share of the cores, so that N workers do not
# spin 2N threads on N cores.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


# Under pytest-xdist (`-n N`), one worker runs all of a module's tests, so that its module-scoped fixtures (a trained
# model, a built index, a server and a browser) are made once, not once per worker. Modules sharing a session fixture
# share a worker too: quick_demo is a real `clip-pacl demo --quick`.
SHARED_SCOPES = {"tests/test_demo.py": "quick_demo", "tests/test_readme.py": "quick_demo"}
# The modules that take longest (the demo and the README's commands, torchrun, benchmark scripts in processes, runs that
# must learn) are handed out first, so that no worker is left running one of them alone at the end.
SLOW_FIRST = ["tests/test_demo.py", "tests/test_readme.py", "tests/test_distributed.py", "tests/test_index_sharded.py",
              "tests/test_perf_benchmarks.py", "tests/test_benchmark_scripts.py", "tests/test_pacl_learning.py",
              "tests/test_train.py", "tests/test_train_steps.py", "tests/test_web_load.py"]


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without it, never called
def pytest_xdist_make_scheduler(config, log):
    """`-n N`: module-scoped scheduling (`--dist loadfile`) with SHARED_SCOPES' modules in one scope, in the order
    collected (SLOW_FIRST first), not xdist's most-tests-first. (`--dist loadgroup` with `xdist_group` marks would
    group them, but pytest-xdist 3.8 cannot rename pytest 9's node ids, so its groups are never formed.)"""
    from xdist.scheduler import LoadScopeScheduling

    if config.getvalue("dist") not in ("load", "loadfile"):  # `-n N` alone means load; another --dist is honoured
        return None

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SHARED_SCOPES.get(module, module)

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(items):
    """In a pytest-xdist worker, SLOW_FIRST's modules come first (each module's tests keep their order)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        first = {module: i for i, module in enumerate(SLOW_FIRST)}
        items.sort(key=lambda item: first.get(item.nodeid.split("::", 1)[0], len(first)))


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
