"""`python -m clip_pacl.train ARGS` / `torchrun --nproc-per-node N -m clip_pacl.train ARGS`: the same
flags as `clip-pacl train`, without the subcommand word."""

import sys

from clip_pacl.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
