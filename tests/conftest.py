import os

import pytest
import torch

# Two cores are shared by every test; one intra-op thread keeps timings predictable and avoids oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
