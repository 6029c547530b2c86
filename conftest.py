"""Fixtures shared by the library tests (tests/) and the benchmark tests (benchmarks/tests/)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: small forwards are far faster than with threads fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
