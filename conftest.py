"""Shared by test_yapo.py and benchmarks/test_benchmarks.py: the long runs in their own process (the command
line, the notebook, each benchmark's --quick mode) start as the session starts, in the background, so that they
use the other core while the in-process tests run; the test that checks a run waits for it.

A test module lists its runs in BACKGROUND, {test name: function(folder) -> the command to run}, longest first;
only the runs of the selected tests start (so `-k` stays fast), as many at a time as there are cores. A test gets
its run's (exit code, stdout, stderr, folder) from the fixture background_run."""

import os
import subprocess
import time

import pytest

TIMEOUT_S = 600


class Background:
    def __init__(self, commands, tmp_path_factory):
        self.waiting = list(commands.items())
        self.running, self.tmp = {}, tmp_path_factory
        self.env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {
            "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
        self.fill()

    def fill(self):
        while self.waiting and sum(p.poll() is None for p, _, _ in self.running.values()) < (os.cpu_count() or 1):
            name, command = self.waiting.pop(0)
            folder = self.tmp.mktemp(name[:40])
            with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:   # no pipe to fill
                proc = subprocess.Popen(command(folder), cwd=folder, env=self.env, stdout=out, stderr=err)
            self.running[name] = (proc, folder, time.monotonic())

    def result(self, name):
        """Waits for the run of test `name`: (its exit code, stdout, stderr, the folder it ran in)."""
        proc, folder, started = self.running[name]
        while proc.poll() is None:                                # keep every core busy meanwhile
            self.fill()
            if time.monotonic() - started > TIMEOUT_S:
                proc.kill()
                pytest.fail(f"the background run of {name} took over {TIMEOUT_S} s")
            time.sleep(0.2)
        self.fill()
        return proc.returncode, (folder / "stdout").read_text(), (folder / "stderr").read_text(), folder

    def stop(self):
        for proc, _, _ in self.running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """Started before the first test, so that the runs overlap with everything else."""
    modules = list(dict.fromkeys(item.module for item in request.session.items))
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    runner = Background({name: command for module in modules for name, command in
                         getattr(module, "BACKGROUND", {}).items() if name in selected}, tmp_path_factory)
    yield runner
    runner.stop()


@pytest.fixture
def background_run(background, request):
    """This test's background run: (exit code, stdout, stderr, folder)."""
    return background.result(getattr(request.node, "originalname", request.node.name))



def pytest_configure(config):
    config.addinivalue_line("markers", "real: needs the packaged pretrained model; runs only with -m real")


def pytest_collection_modifyitems(config, items):
    """Tests marked real (benchmarks/test_real.py) run only when asked for with -m real."""
    if "real" in (config.getoption("markexpr") or ""):
        return
    for item in items:
        if "real" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="opt-in: python -m pytest -m real benchmarks/test_real.py"))
