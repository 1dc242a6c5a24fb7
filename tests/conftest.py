import os

import pytest
import torch
from hypothesis import settings

# CI must not turn red on a draw nobody can reproduce: by default hypothesis searches the same
# examples every run. HYPOTHESIS_PROFILE=explore draws new ones (for hunting bugs locally).
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# tests are about numbers, not throughput: keep them off the other core's back
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped where torch sees none")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def single_thread():
    """One intra-op thread, for modules that set ``pytestmark = pytest.mark.usefixtures("single_thread")``:
    their numbers are then bitwise stable and small nets do not wait on OpenMP barriers."""
    from torchopt_ext.distill.models import one_thread
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny():
    """30 training images per class of the 8x8 digits, the test part untouched (a module may define its own)."""
    from tests.helpers import condense_fixtures
    return condense_fixtures.tiny_digits()
