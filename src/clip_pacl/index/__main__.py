"""`python -m clip_pacl.index build ARGS` / `torchrun --nnodes N --nproc-per-node M -m clip_pacl.index build ARGS`:
the same flags as `clip-pacl index build`, without the word `index`."""

import sys

from clip_pacl.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
