"""Shared by test_yapo.py and benchmarks/test_benchmarks.py: the opt-in marker `real`, and under pytest-xdist one
thread per worker and per process a test starts (xdist already runs a worker per core; more threads than cores make
torch's threads wait on each other, many times slower). The tests hold at any thread count."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"       # before torch is imported; the processes tests start inherit it

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "real: needs the packaged pretrained model; runs only with -m real")


def pytest_collection_modifyitems(config, items):
    """Tests marked real (benchmarks/test_real.py) run only when asked for with -m real."""
    if "real" in (config.getoption("markexpr") or ""):
        return
    for item in items:
        if "real" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="opt-in: python -m pytest -m real benchmarks/test_real.py"))
