"""Fixtures shared by the library tests (tests/) and the benchmark tests (benchmarks/tests/), and
one torch thread per test worker."""

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker (`-n 2` in pyproject.toml) and the processes its tests start run
    one torch thread: the tests' small forwards gain nothing from threads, and two workers with two
    threads each fight for the cores (measured on 2 cores: 452 s with one thread a worker, 817 s in
    one process, 867 s with two workers of two threads)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Models and families registered in a test are dropped after it."""
    from prune.zoo import registry

    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))


@pytest.fixture
def one_thread():
    """One torch thread: small forwards are far faster than with threads fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
