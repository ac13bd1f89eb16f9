import os
import sys

import pytest
import torch

# Tests import the top-level research scripts (train.py, dataset.py, ...) the way the scripts import each other.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture
def one_thread():
    """One torch thread for the test: deterministic float reductions and polite on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
