"""Shared fixtures for the unit tests (notebook hooks, if any, live in the root conftest.py)."""
import pytest
import torch
from hypothesis import settings

# The unit suite uses tiny tensors: one thread avoids thread start-up costs and keeps results
# independent of how many cores the (shared) machine has.
torch.set_num_threads(1)

# Property tests: few examples, no deadline (the shared CI machine has noisy timings).
settings.register_profile("unit", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("unit")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same torch RNG state, so a failure reproduces exactly."""
    torch.manual_seed(0)
    yield
