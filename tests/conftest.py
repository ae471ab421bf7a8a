import warnings

import pytest
import torch

from fedgen.config import ExperimentConfig, load_config

# vmap over SDPA attention falls back to a slower loop and says so on every call.
warnings.filterwarnings("ignore", message=".*performance drop.*")


@pytest.fixture(scope="session")
def base_config() -> ExperimentConfig:
    return load_config([])


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)


@pytest.fixture
def one_torch_thread():
    """For tests of small tensors: on a shared, oversubscribed machine a second intra-op thread
    made each step several times slower. Use with `pytest.mark.usefixtures`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
