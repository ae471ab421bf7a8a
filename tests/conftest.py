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
