import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Router, shards and the reference model share 2 cores; more threads only thrash.
    torch.set_num_threads(1)
