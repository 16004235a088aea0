"""Runs `clip-pacl` commands in this process, one after another, and reports what each cost.

`python tests/hostile_runner.py CASES.json` reads [[name, argv], ...] and prints one JSON line per case: the exit
code, stderr, the growth of the peak resident set over the RSS before the case (the peak is reset before each case
through /proc/self/clear_refs, so it is this case's peak), the peak of any child process, and the seconds taken.
The heap is capped (RLIMIT_DATA) at HOSTILE_HEAP_LIMIT bytes over what torch's import used, so a loader that does
allocate what a hostile file claims fails here instead of taking the machine's memory.
"""

import contextlib
import io
import json
import os
import resource
import sys
import time


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def main(cases_file: str) -> None:
    import torch  # noqa: F401  (imported before the cap and the measurements: its own size is not the case's)

    from clip_pacl_app.cli.main import main as cli_main

    with contextlib.redirect_stdout(io.StringIO()):  # imports every command's module and the loaders': their size
        cli_main(["info", "tiny"])                   # is not the case's either
    limit = _status("VmData") + int(os.environ.get("HOSTILE_HEAP_LIMIT", 3 * 2**30))
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    for name, argv in json.load(open(cases_file)):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
        err, out = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = cli_main(argv)
        except BaseException as e:  # a traceback: what the CLI must never show
            code, err = -1, io.StringIO(f"{type(e).__name__}: {e}")
        seconds = time.perf_counter() - start
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(json.dumps({"name": name, "code": code, "stderr": err.getvalue(), "stdout": out.getvalue()[-2000:],
                          "rss_growth": _status("VmHWM") - before, "children_rss": children, "seconds": seconds}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
