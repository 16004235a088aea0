import os

import pytest
import torch

# Tests are small: keep them deterministic and let the two CPU threads do the work.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
