"""`python -m clip_pacl_app ARGS` is `clip-pacl ARGS`: the form torchrun needs
(`torchrun --nproc-per-node N -m clip_pacl_app train ...`, `torchrun ... -m clip_pacl_app index build ...`)."""

import sys

from clip_pacl_app.cli.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
