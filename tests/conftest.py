import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

# the suite must hold whatever the thread count (summation orders change with it): OMP_NUM_THREADS=1, 2 and 4 are
# each run before a change lands, and torch's own intra-op threads follow the variable
if os.environ.get("OMP_NUM_THREADS", "").isdigit():
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
