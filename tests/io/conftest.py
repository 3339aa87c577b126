"""The models here are tiny: one intra-op thread is faster than several, and much faster on a
busy machine where threads would wait for each other."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
