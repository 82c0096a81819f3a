"""Shared by test_yapo.py and benchmarks/test_benchmarks.py: the opt-in marker `real`."""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "real: needs the packaged pretrained model; runs only with -m real")


def pytest_collection_modifyitems(config, items):
    """Tests marked real (benchmarks/test_real.py) run only when asked for with -m real."""
    if "real" in (config.getoption("markexpr") or ""):
        return
    for item in items:
        if "real" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="opt-in: python -m pytest -m real benchmarks/test_real.py"))
