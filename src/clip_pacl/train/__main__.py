"""`python -m clip_pacl.train ARGS`: the old name of `python -m clip_pacl_app train ARGS`, kept working (the same
flags as `clip-pacl train`, without the subcommand word)."""

import sys

from clip_pacl_app.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
