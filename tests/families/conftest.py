import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The family models are tiny: a second intra-op thread only adds barrier waits (seconds per test on a
    busy machine), so these tests run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
