import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """The models here are tiny: one intra-op thread is as fast, and on a shared 2-core machine it
    avoids OpenMP threads spinning against other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
