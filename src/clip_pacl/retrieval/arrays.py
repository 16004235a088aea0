"""Reading a stored embedding matrix (`embeddings.npy`) at the cost of the bytes the file really holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clip_pacl.console import human_bytes

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def load_matrix(path: str | Path) -> np.ndarray:
    """The 2-D float array in a `.npy` file. Its header is read first and its shape x dtype checked against the
    file's length, so a header that claims more rows than the file holds is refused before anything is allocated.
    Raises ValueError (a damaged file) with one line."""
    path = Path(path)
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10_000)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10_000)
        else:
            raise ValueError(f"{path.name} has .npy format version {version}, which is not read")
        offset = f.tell()
    if len(shape) != 2 or dtype.type not in FLOAT_DTYPES or fortran:
        raise ValueError(f"{path.name} holds a {'Fortran-order ' if fortran else ''}{dtype} array of shape "
                         f"{shape}, not a 2-D float matrix")
    needed, held = shape[0] * shape[1] * dtype.itemsize, path.stat().st_size - offset
    if needed != held:
        raise ValueError(f"{path.name}'s header declares {shape} {dtype} ({human_bytes(needed)}) but the file "
                         f"holds {human_bytes(held)} of data")
    return np.load(path, allow_pickle=False)
