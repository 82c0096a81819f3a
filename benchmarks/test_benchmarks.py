"""Smoke tests of the benchmark scripts: each runs in --quick mode (on the CPU, no hub) and must write every JSON
field it documents; values that can be checked independently and cheaply are checked too. They run through their
main(argv) in this process (a new Python process would import torch, transformers and sae-lens again, ~6 s), except
bench_train_step.py, which forks a child per variant and so runs in a process of its own.

    python -m pytest -q benchmarks/test_benchmarks.py
"""

import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ["none", "CAA", "SAS", "BiPO", "YaPO"]
sys.path.insert(0, str(HERE))                     # the scripts import their neighbour common.py


def quick_main(folder, script, *extra):
    """benchmarks/SCRIPT's --quick mode through its main(argv), writing its JSON into FOLDER: that JSON."""
    importlib.import_module(script).main(["--quick", "--out", str(folder / "out.json"), *extra])
    return quick_json(folder)


def quick_run(folder, script, *extra):
    """`python benchmarks/SCRIPT --quick` in a process of its own, in FOLDER, offline and on the CPU; it must
    succeed: its JSON."""
    done = subprocess.run([sys.executable, str(HERE / script), "--quick", "--out", str(folder / "out.json"), *extra],
                          cwd=folder, capture_output=True, text=True, timeout=600, env=os.environ | {
                              "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return quick_json(folder)


def quick_json(folder):
    data = json.loads((folder / "out.json").read_text())
    assert data["quick"] is True
    assert "never real behaviour" in data["note"]
    return data


def safe_vector(path):
    from safetensors.torch import load_file
    return load_file(str(path))["v"]


def has(d, keys):
    missing = set(keys) - set(d)
    assert not missing, f"missing fields {sorted(missing)}"


def close(a, b, tol=1e-6):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def two_level_interval(a, b, groups):
    """The paired interval written out by hand, to check common.paired_interval: a and b are [runs][pairs] values.
    Per pair the seed-averaged difference; the cluster-robust variance of its mean over the groups, plus each
    method's run-to-run variance over its runs; Student's t at the Welch-Satterthwaite degrees of freedom.
    Returns (per-pair differences, mean, half-width)."""
    from scipy import stats
    d = [statistics.fmean(x) - statistics.fmean(y) for x, y in zip(zip(*a), zip(*b))]
    mean, C = statistics.fmean(d), len(set(groups))
    sums = {g: sum(x for x, h in zip(d, groups) if h == g) for g in groups}
    parts = [(C / (C - 1) * sum((sums[g] - mean * groups.count(g)) ** 2 for g in sums) / len(d) ** 2, C - 1)]
    parts += [(statistics.variance([statistics.fmean(r) for r in runs]) / len(runs), len(runs) - 1)
              for runs in (a, b)]
    var = sum(v for v, _ in parts)
    return d, mean, stats.t.ppf(0.975, var ** 2 / sum(v ** 2 / k for v, k in parts)) * var ** 0.5


def test_compare_methods_quick(tmp_path, capsys):
    # culture_egypt: its MCQ rows with both forms exercise the MCQ accuracy, RCA and PNLG columns too;
    # --kl 0.002: some method crosses it in the sweep
    import torch
    data = quick_main(tmp_path, "compare_methods", "--behavior", "culture_egypt", "--kl", "0.002", "--device", "cpu")
    stdout = capsys.readouterr().out
    has(data, ["benchmark", "quick", "tiny", "mechanics_only", "setup", "behavior", "seed", "kl_threshold", "shapes",
               "args", "machine", "methods", "table", "markdown", "note"])
    assert data["tiny"] and data["mechanics_only"] and "MECHANICS ONLY" in data["note"]
    assert list(data["methods"]) == METHODS and [r["method"] for r in data["table"]] == METHODS
    kl, sweep_ms = data["kl_threshold"], data["shapes"]["multipliers"]
    assert -1.0 in sweep_ms and 0.0 in sweep_ms and 1.0 in sweep_ms
    for row in data["table"]:
        has(row, ["method", "build_s", "lam", "score_minus_1", "score_plus_1", "margin_minus_1", "margin_plus_1",
                  "accuracy_minus_1", "accuracy_plus_1", "drift_kl_plus_1", "mcq_accuracy_plus_1", "rca_plus_1",
                  "pnlg_plus_1", "m_at_kl", "score_at_kl", "margin_at_kl"])
        assert row["mcq_accuracy_plus_1"] is not None                     # culture_egypt has MCQ rows
    unsteered = None
    for name, m in data["methods"].items():
        has(m, ["mode", "space", "lam", "build_seconds", "l0", "norm", "rows", "at_kl"])
        assert [r["multiplier"] for r in m["rows"]] == sweep_ms
        by_m = {r["multiplier"]: r for r in m["rows"]}
        assert all("mcq" in r for r in m["rows"])
        row = next(r for r in data["table"] if r["method"] == name)
        assert row["score_plus_1"] == by_m[1.0]["behavior_score"] and row["drift_kl_plus_1"] == by_m[1.0]["drift_kl"]
        assert row["mcq_accuracy_plus_1"] == by_m[1.0]["mcq"]["accuracy"]
        unsteered = unsteered or by_m[0.0]
        assert close(by_m[0.0]["behavior_score"], unsteered["behavior_score"])   # m = 0: no steering at all
        assert abs(by_m[0.0]["drift_kl"]) < 1e-9
        hit = m["at_kl"]
        if hit is None:
            assert row["m_at_kl"] == row["score_at_kl"] == row["margin_at_kl"] == "not reached"
        else:                 # evaluated again at a multiplier whose measured drift is within 5 % of the threshold
            assert hit["multiplier"] > 0 and abs(hit["drift_kl"] / kl - 1) <= 0.05
            assert row["m_at_kl"] == hit["multiplier"]
            margins = torch.tensor(hit["per_pair"]["margin"], dtype=torch.float64)
            assert close(row["score_at_kl"], torch.sigmoid(margins).mean().item(), 1e-5)
            assert close(row["margin_at_kl"], margins.mean().item(), 1e-5)
    assert any(m["at_kl"] for m in data["methods"].values()), "no method reached --kl: the check above is empty"
    # YaPO minus each method at equal drift: the mean of per-pair differences between the two calibrated rows
    for r in (r for r in data["paired"] if r["at"] == f"KL {kl:g}" and r["metric"] == "margin" and r["n"]):
        other = data["methods"][r["comparison"].removeprefix("YaPO - ")]["at_kl"]["per_pair"]["margin"]
        mine = data["methods"]["YaPO"]["at_kl"]["per_pair"]["margin"]
        assert close(r["difference"], statistics.fmean(a - b for a, b in zip(mine, other)))
    none = data["methods"]["none"]
    assert none["l0"] == 0 and none["at_kl"] is None
    assert len({(r["behavior_score"], r["margin"], r["accuracy"], r["mcq"]["accuracy"]) for r in none["rows"]}) == 1
    assert all(r["drift_kl"] == 0 for r in none["rows"])
    assert data["methods"]["SAS"]["l0"] > 0 and data["methods"]["YaPO"]["space"] == "SAE latents"
    # CAA and SAS vectors are mean differences in the units of h (or latents): lam 1, never the run's lam
    assert data["methods"]["CAA"]["lam"] == data["methods"]["SAS"]["lam"] == 1.0
    assert data["args"]["lam"] == "auto" and min(data["methods"][m]["lam"] for m in ("YaPO", "BiPO")) > 0  # measured
    assert data["sae_fit"]["fvu"] < 0.5 and data["sae_fit"]["l0"] > 0
    markdown = (tmp_path / data["markdown"]).read_text()
    assert "MECHANICS ONLY" in markdown and all(f"| {name} |" in markdown for name in METHODS)
    assert "RCA m=+1" in markdown and "MECHANICS ONLY" in stdout


def test_compare_methods_pool_reads_the_seeds_together_with_groups_and_seeds_in_the_interval(tmp_path, capsys):
    """--pool on the three committed toy runs writes the committed pooled table, and its YaPO minus BiPO score at KL
    0.2 is the mean of seed-averaged per-pair differences, its interval the cluster-robust variance over the toy's
    question groups plus each method's run-to-run variance, Student's t at the Welch-Satterthwaite df."""
    import compare_methods
    import torch
    import yapo
    names = ["compare_methods.json", "compare_methods_seed1.json", "compare_methods_seed2.json"]
    for name in names:
        shutil.copy(ROOT / "benchmarks" / "results" / name, tmp_path / name)
    data = compare_methods.main(["--pool", *(str(tmp_path / n) for n in names)])
    committed = json.loads((ROOT / "benchmarks" / "results" / "compare_methods_pooled.json").read_text())
    assert [r["difference"] for r in data["paired"]] == [r["difference"] for r in committed["paired"]]
    assert [r.get("verdict") for r in data["paired"]] == [r.get("verdict") for r in committed["paired"]]

    runs = [json.loads((tmp_path / n).read_text())["methods"] for n in names]
    score = lambda m: [torch.sigmoid(torch.tensor(r[m]["calibrated"]["0.2"]["plus"]["per_pair"]["margin"],
                                                  dtype=torch.float64)).tolist() for r in runs]
    a, b = score("YaPO"), score("BiPO")
    groups = [p["group"] or p["where"] for p in yapo.load_pairs(yapo.parse_args(["--tiny"]))[1]]
    d, mean, half = two_level_interval(a, b, groups)
    (row,) = [r for r in data["paired"] if (r["comparison"], r["at"], r["metric"]) == ("YaPO - BiPO", "KL 0.2",
                                                                                       "behavior_score")]
    assert row["n"] == len(d) == 36 and close(row["difference"], mean) and close(row["ci95"], half)

    other = json.loads((tmp_path / names[1]).read_text())                 # another held-out set: refused
    other["methods"]["none"]["rows"][0]["per_pair"]["margin"][0] += 1.0
    (tmp_path / names[1]).write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="same held-out pairs"):
        compare_methods.main(["--pool", *(str(tmp_path / n) for n in names)])


def test_compare_methods_help_lists_the_yapo_flags_it_passes_through(capsys):
    import compare_methods
    with pytest.raises(SystemExit):
        compare_methods.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--format", "--country", "--lam", "--epochs", "--lr", "--sas-tau", "--reference", "--dtype"):
        assert f"{flag} " in text
    listed = set(re.findall(r"--([a-z-]+)", text))
    import yapo
    set_by_the_script = {"method", "multipliers", "n-generations", "max-new-tokens", "top-k", "eval-only", "vector",
                         "export-gguf", "export-multiplier", "out-dir"}
    assert {f.name.replace("_", "-") for f in dataclasses.fields(yapo.Args)} <= listed | set_by_the_script


@pytest.mark.parametrize("script", ["bench_convergence", "bench_pruning", "bench_train_step"])
def test_a_local_model_without_its_layer_or_sae_is_refused_before_any_work(script, capsys):
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit):
        main(["--model", "some/folder", "--sae", "some/sae"])
    assert "--model needs --layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "some/folder", "--layer", "10"])
    assert "--model needs --sae" in capsys.readouterr().err


def test_the_local_saes_text_is_every_behaviours_training_split_and_no_held_out_pair():
    """local_gemma3.training_texts: the sample data's training pairs through the chat template, x + y_w and x + y_l,
    for every behaviour, including one whose rows are all held out (toy_sentiment_novel adds nothing)."""
    import yapo
    from local_gemma3 import training_texts
    from offline import tiny_tokenizer
    rows = [row for _, row in yapo.read_rows(str(ROOT / "data_sample.jsonl"))]
    tok = tiny_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected") if r.get(k)], vocab_size=300)
    seqs = training_texts(tok)
    expected, held_out = [], []
    for behavior in sorted({r["behavior"] for r in rows}):
        train, test = yapo.load_pairs(yapo.Args(data=str(ROOT / "data_sample.jsonl"), behavior=behavior),
                                      need_train=False)
        expected += [x + y for p in train for x, w, l in [yapo.tokenize_pair(tok, p)] for y in (w, l)]
        held_out += [x + w for p in test for x, w, l in [yapo.tokenize_pair(tok, p)]]
    assert seqs == expected and len(seqs) > 0
    assert not {tuple(s) for s in seqs} & {tuple(s) for s in held_out}


def test_toy_chaos_quick_same_seed_same_bits_and_a_nudge_of_1e_12_grows_a_millionfold(tmp_path):
    """The README's case for committing the toy: trained again, its language model is the same bit for bit; from initial
    weights moved by 1e-12 it ends a million times further apart, even in 13 steps, in float32 and float64."""
    data = quick_main(tmp_path, "toy_chaos")
    assert [r["dtype"] for r in data["rows"]] == ["float32", "float64"]
    for r in data["rows"]:
        assert r["repeat_max_abs_difference"] == 0.0
        assert r["nudged_max_abs_difference"] > 1e6 * data["epsilon"]


def test_toy_transfer_quick(tmp_path):
    data = quick_main(tmp_path, "toy_transfer", "--reviews", "100")
    assert [(t["seed"], t["reviews"]) for t in data["toys"]] == [(0, 100)]
    for toy in data["toys"]:
        assert toy["test_pairs"]["toy_sentiment_novel"] == 23
        for sets in toy["methods"].values():
            for rows in sets.values():
                assert [r["multiplier"] for r in rows] == [-1.0, 0.0, 1.0]
                assert rows[1]["drift_kl"] == 0.0                     # m = 0 steers nothing


def test_pruning_quick(tmp_path):
    data = quick_main(tmp_path, "bench_pruning")
    has(data, ["benchmark", "quick", "shapes", "args", "machine", "vector", "rows", "note"])
    d_sae = data["shapes"]["d_sae"]
    assert [str(r["k"]) for r in data["rows"]] == ["8", "32", "128", f"all ({d_sae})"]
    for r in data["rows"]:
        has(r, ["k", "latents", "norm_share", "score_minus_1", "score_0", "score_plus_1", "margin_minus_1",
                "margin_plus_1", "accuracy_minus_1", "accuracy_plus_1", "effect", "share_of_effect", "drift_kl_plus_1"])
        assert r["latents"] == (min(r["k"], d_sae) if isinstance(r["k"], int) else d_sae)
        assert close(r["effect"], r["score_plus_1"] - r["score_minus_1"])
    # m = 0 steers nothing: the same unsteered score whatever the pruning
    assert len({round(r["score_0"], 6) for r in data["rows"]}) == 1
    shares = [r["norm_share"] for r in data["rows"]]
    assert all(x <= y + 1e-6 for x, y in zip(shares, shares[1:])) and close(shares[-1], 1.0)
    assert data["vector"]["l0"] <= d_sae


def test_convergence_quick(tmp_path):
    data = quick_main(tmp_path, "bench_convergence")
    has(data, ["benchmark", "quick", "shapes", "machine", "decoder_row_norm", "summary", "curves", "png", "note"])
    shapes = data["shapes"]
    assert {(s["size"], s["method"]) for s in data["summary"]} == {
        (size, m) for size in ("tiny", "small") for m in ("YaPO", "BiPO")}
    thresholds = [f"steps_to_loss_below_{t}" for t in shapes["loss_thresholds"]]
    for s in data["summary"]:
        has(s, thresholds + ["size", "method", "steps_to_accuracy_1", "min_loss", "last_epoch_loss", "seconds_per_run"])
        for metric in thresholds + ["steps_to_accuracy_1", "min_loss", "last_epoch_loss"]:
            has(s[metric], ["mean", "std", "reached", "per_seed"])
            assert len(s[metric]["per_seed"]) == len(shapes["seeds"])
        curve = data["curves"][s["size"]]["sparse" if s["method"] == "YaPO" else "dense"]
        for seed_losses, lowest in zip(curve["loss"], s["min_loss"]["per_seed"]):
            assert len(seed_losses) == shapes["steps"] and abs(min(seed_losses) - lowest) < 1e-4
    for size in ("tiny", "small"):
        has(shapes["sizes"][size], ["hidden_size", "layers", "layer", "d_sae"])
    assert (tmp_path / data["png"]).stat().st_size > 0


def test_evaluate_quick(tmp_path):
    data = quick_main(tmp_path, "bench_evaluate")
    has(data, ["benchmark", "quick", "model", "shapes", "machine", "variants", "naive_vs_yapo_max_abs_difference",
               "target", "note"])
    assert data["naive_vs_yapo_max_abs_difference"] < 1e-4             # the same metrics, computed two ways
    (k,) = data["shapes"]["option_counts"]                              # options per MCQ pair
    base = 1 / len(data["shapes"]["multipliers"])                       # the unsteered prompt pass, once per call
    # k cyclic orders of an item's k options: its prompt in each order, each order's k options
    expected = {"naive": (2 + 1 + k * k + base, 0), "yapo": (2 + k + base, k * k), "floor": (2 + k + base, 0)}
    for name, (sequences, continuations) in expected.items():
        v = data["variants"][name]
        has(v, ["median_s", "seconds", "s_per_pair_per_multiplier", "sequences_per_pair_per_multiplier",
                "continuations_per_pair_per_multiplier", "tokens_per_pair_per_multiplier", "over_floor"])
        assert close(v["sequences_per_pair_per_multiplier"], sequences)
        assert close(v["continuations_per_pair_per_multiplier"], continuations)
        assert close(v["over_floor"], v["median_s"] / data["variants"]["floor"]["median_s"])
    assert data["variants"]["yapo"]["tokens_per_pair_per_multiplier"] < data["variants"]["naive"][
        "tokens_per_pair_per_multiplier"]


def test_train_step_quick(tmp_path):
    data = quick_run(tmp_path, "bench_train_step.py")
    assert set(data) == {"benchmark", "quick", "shapes", "machine", "measured", "variants", "ratios", "targets",
                         "b_c_loss_max_abs_difference", "authors_trainer_same_machine", "note"}
    # the authors' trainer was timed by hand: the output quotes that record, how it was taken included
    quoted = json.loads((HERE / "results" / "authors_trainer.json").read_text())
    assert data["authors_trainer_same_machine"] == quoted and "not measured by this repo's scripts" in quoted["how"]
    shapes = data["shapes"]
    assert set(data["variants"]) == {"a_floor", "b_yapo", "c_naive"}
    for name, v in data["variants"].items():
        has(v, ["median_step_s", "median_cpu_s", "step_s", "peak_growth_mb", "peak_rss_mb", "baseline_rss_mb",
                "losses_first_round"])
        assert len(v["step_s"]) == shapes["rounds"] * shapes["steps"][name]
        assert v["median_step_s"] == statistics.median(v["step_s"])
        assert len(v["losses_first_round"]) == shapes["warmup"] + shapes["steps"][name]
        assert v["peak_rss_mb"] >= v["baseline_rss_mb"] > 0
    has(data["ratios"], ["b_over_a", "c_over_b", "b_over_a_cpu", "c_over_b_cpu"])
    a, b, c = (data["variants"][n]["median_step_s"] for n in ("a_floor", "b_yapo", "c_naive"))
    assert close(data["ratios"]["b_over_a"], b / a) and close(data["ratios"]["c_over_b"], c / b)
    # (b) and (c) compute the same loss two ways (one reference pass up front vs. one per step, one vs. two decodes)
    assert data["b_c_loss_max_abs_difference"] < 1e-3
    assert shapes["batch_shape"][0] == 2 * len(shapes["prompt_lens"])


def test_generate_quick(tmp_path):
    data = quick_main(tmp_path, "bench_generate")
    has(data, ["benchmark", "quick", "shapes", "machine", "measured", "unsteered_ms_per_token", "variants",
               "target", "note"])
    shapes = data["shapes"]
    assert set(data["variants"]) == {"unsteered", "dense", "sparse full", f"sparse top-{shapes['top_k']}"}
    for v in data["variants"].values():
        has(v, ["median_s", "tokens_per_s", "relative_to_unsteered", "seconds", "hook_us_per_token",
                "hook_share_of_token_time"])
        assert len(v["seconds"]) == shapes["repeats"]
        assert v["median_s"] == statistics.median(v["seconds"])
        assert close(v["tokens_per_s"], shapes["batch"] * shapes["new_tokens"] / v["median_s"])
    unsteered = data["variants"]["unsteered"]
    assert unsteered["relative_to_unsteered"] == 1.0 and unsteered["hook_us_per_token"] == 0.0
    assert close(data["unsteered_ms_per_token"], 1000 * unsteered["median_s"] / shapes["new_tokens"])


def test_sweep_tiny_resumes_and_reports(tmp_path, capsys, monkeypatch):
    """benchmarks/sweep.py on the toy: a second run finds every unit and rewrites none, and the report's YaPO minus
    BiPO at equal drift is the mean (and 1.96 standard errors) of per-pair differences computed here from the units.
    Every unit records its SAE's fingerprint; the report refuses units of two SAEs, and a run refuses to add to them."""
    folder = tmp_path / "sweep"
    monkeypatch.chdir(ROOT)                                        # sweep.py moves there; come back after

    def sweep(*argv):                                              # its main(argv), as quick_main: stdout
        importlib.import_module("sweep").main([*argv, "--tiny", "--seeds", "0", "1", "--results", str(folder)])
        return capsys.readouterr().out

    sweep("run")
    units = sorted(folder.rglob("*.json"))
    assert sorted(p.name for p in units) == sorted(["none.json", "CAA.json", "SAS.json"] + [
        f"{m}_seed{s}.json" for m in ("BiPO", "YaPO") for s in (0, 1)])
    mtimes = [p.stat().st_mtime_ns for p in units]
    import yapo
    for path in units:                   # each unit's vector beside it, and its rows at a measured, calibrated drift
        unit = json.loads(path.read_text())
        sparse = yapo.uses_sae(unit["args"]["method"])         # the toy: d_sae 512, d_model 64
        assert safe_vector(path.with_suffix(".safetensors")).numel() == (512 if sparse else 64)
        for kl, sides in unit["at_kl"].items():
            for side, row in sides.items():
                assert row is None or (abs(row["drift_kl"] / float(kl) - 1) <= 0.05
                                       and (row["multiplier"] > 0) == (side == "plus"))
    assert any(row for p in units for sides in json.loads(p.read_text())["at_kl"].values() for row in sides.values())
    assert "ran 0 units, skipped 7 that exist" in sweep("run")
    assert [p.stat().st_mtime_ns for p in units] == mtimes
    sweep("report")
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["units"] == 7 and data["missing"] == [] and data["correction"] == "Holm"
    assert data["comparisons"] == sum(r["p"] is not None for r in data["paired"]) > 0

    # YaPO minus BiPO on the margin at KL 0.05, from the rows at each run's calibrated multiplier: the seed-averaged
    # difference per pair; its variance the cluster-robust one over the items' groups plus each method's run-to-run
    # variance over its runs; Student's t at the Welch-Satterthwaite degrees of freedom
    margins = lambda m: [json.loads((folder / "toy_sentiment" / f"{m}_seed{s}.json").read_text())["at_kl"]["0.05"][
        "plus"]["per_pair"]["margin"] for s in (0, 1)]
    a, b = margins("YaPO"), margins("BiPO")
    import yapo
    groups = [p["group"] for p in yapo.load_pairs(yapo.parse_args(["--tiny"]))[1][:4]]
    d, mean, half = two_level_interval(a, b, groups)
    (row,) = [r for r in data["paired"] if r["comparison"] == "YaPO - BiPO" and r["metric"] == "margin"
              and r["at"] == "KL 0.05"]
    assert row["n"] == len(d) == 4 and row["runs_reaching"] == "2/2 vs 2/2"
    assert close(row["difference"], mean) and close(row["ci95"], half)
    tested = [r for r in data["paired"] if r["p"] is not None]   # Holm's verdicts, across every comparison
    rejects = importlib.import_module("common").holm([r["p"] for r in tested])
    assert [r["verdict"].split(" at ")[0] for r in tested] == [
        ("better" if r["difference"] > 0 else "worse") if x else "cannot tell" for r, x in zip(tested, rejects)]

    fingerprints = {json.loads(p.read_text())["sae_sha256"] for p in units}
    assert len(fingerprints) == 1 and data["sae_sha256"] in fingerprints and re.fullmatch(r"[0-9a-f]{64}",
                                                                                          data["sae_sha256"])
    other = json.loads(units[0].read_text()) | {"sae_sha256": "0" * 64}     # as if built with another SAE
    units[0].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="2 different SAEs"):
        sweep("report")
    units[-1].unlink()                                             # a unit to make: refused before it is made
    with pytest.raises(SystemExit, match="different SAEs"):
        sweep("run")
    assert not units[-1].exists()


def test_a_sweep_unit_another_live_call_is_making_is_left_to_it_and_a_stale_marker_is_taken_over(tmp_path):
    """Two sweep.py calls on one folder: a unit whose marker names a live process is not made again; a marker left
    by a process that has ended is taken over, and removed once the unit is written."""
    import collections
    sweep = importlib.import_module("sweep")
    path, made = tmp_path / "b" / "YaPO_seed0.json", []
    make = lambda: made.append(1) or {"unit": 1}
    marker = path.parent / ".YaPO_seed0.json.running"
    path.parent.mkdir()
    marker.write_text(str(os.getppid()))                                   # a live process holds it
    tally = collections.Counter()
    assert sweep.unit(path, make, sweep.Budget(60), "x", tally) is None
    assert made == [] and tally["made by another call"] == 1 and not path.exists()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    marker.write_text(str(ended.pid))                                      # its process has ended
    assert sweep.unit(path, make, sweep.Budget(60), "x", tally) == {"unit": 1}
    assert made == [1] and json.loads(path.read_text()) == {"unit": 1} and not marker.exists()


def test_sweep_convergence_tiny_resumes_and_summarises(tmp_path, capsys, monkeypatch):
    """`sweep.py convergence` on the toy: a second call on the same folder accepts its summary (it names the units'
    SAE), reads every unit back and rewrites none; validation picks, per method, the lr with the largest margin gain
    under the drift limit; and a summary row's steps to each loss threshold, its margin gain and YaPO's paired
    difference from BiPO are recomputed here from the units' losses and rows."""
    folder = tmp_path / "sweep"
    monkeypatch.chdir(ROOT)
    sweep_module = importlib.import_module("sweep")

    def convergence():
        sweep_module.main(["convergence", "--tiny", "--seeds", "0", "--results", str(folder)])
        return capsys.readouterr().out

    convergence()
    units = sorted((folder / "convergence").glob("*.json"))
    lrs = sweep_module.CONVERGENCE["lrs"]
    assert sorted(p.name for p in units) == sorted(
        [f"{s}_{m}_seed0.json" for s in ("paper", "best_lr") for m in ("BiPO", "YaPO")]
        + [f"validation_{m}_lr{lr:g}.json" for m in ("BiPO", "YaPO") for lr in lrs])
    summary = json.loads((folder / "convergence.json").read_text())
    assert summary["sae_sha256"] == json.loads(units[0].read_text())["sae_sha256"]
    mtimes = [p.stat().st_mtime_ns for p in [*units, folder / "convergence.json"]]
    assert "ran 0 units, skipped 10 that exist" in convergence()   # the summary names its SAE: the folder is one SAE's
    assert [p.stat().st_mtime_ns for p in units] == mtimes[:-1]

    read = lambda name: json.loads((folder / "convergence" / name).read_text())
    best = {}
    for method in ("BiPO", "YaPO"):
        val = [read(f"validation_{method}_lr{lr:g}.json") for lr in lrs]
        under = [r for r in val if (r["drift_at_1"] + r["drift_at_minus_1"]) / 2 <= 0.5] or [val[0]]
        assert summary["chosen_lr"][method] == max(under, key=lambda r: r["margin_gain"])["lr"]
        run = read(f"best_lr_{method}_seed0.json")
        assert run["lr"] == summary["chosen_lr"][method] and len(run["losses"]) == run["steps"]
        (row,) = [r for r in summary["summary"] if (r["setting"], r["method"]) == ("best_lr", method)]
        for t in sweep_module.CONVERGENCE["loss_thresholds"]:
            first = next((i for i, x in enumerate(run["losses"]) if x < t), None)
            assert row[f"steps_to_loss_below_{t}"]["per_seed"] == [first]
        last_epoch = run["losses"][-math.ceil(run["train_pairs"] / 4):]             # batch 4: steps per epoch
        assert close(row["last_epoch_loss"]["mean"], statistics.fmean(last_epoch))
        margin = {r["multiplier"]: r["per_pair"]["margin"] for r in run["rows"]}
        gains = [a - b for a, b in zip(margin[1.0], margin[-1.0])]
        assert row["n"] == len(gains) == 4 and close(row["margin_gain"]["mean"], statistics.fmean(gains))
        assert close(row["margin_gain"]["ci95"], 1.96 * statistics.stdev(gains) / len(gains) ** 0.5)
        best[method] = gains
    (paired,) = [p for p in summary["paired"] if p["setting"] == "best_lr"]
    diffs = [a - b for a, b in zip(best["YaPO"], best["BiPO"])]
    assert paired["n"] == 4 and close(paired["difference"], statistics.fmean(diffs))
    assert close(paired["ci95"], 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5)


def test_the_paired_interval_covers_the_true_difference_and_counts_question_groups_and_seeds():
    """Synthetic held-out sets whose answer is known: 20 questions in two forms whose effects are shared (r near
    0.9), three seeds with a seed effect. Over 300 draws the 95 % interval holds the true difference about 95 % of
    the time, and it is much wider than the interval that takes the 40 pairs as independent and the seeds as one."""
    import common
    import torch
    g = torch.Generator().manual_seed(0)
    truth, clusters, hits, widths, pair_only = 0.3, [i // 2 for i in range(40)], 0, [], []
    for draw in range(300):
        question = (0.3 * torch.randn(20, generator=g, dtype=torch.float64)).repeat_interleave(2)
        seeds = 0.1 * torch.randn(3, 1, generator=g, dtype=torch.float64)
        a = truth + question + seeds + 0.1 * torch.randn(3, 40, generator=g, dtype=torch.float64)
        r = common.paired_interval(a, torch.zeros(1, 40, dtype=torch.float64), clusters)
        hits += abs(r["difference"] - truth) <= r["ci95"]
        widths.append(r["ci95"])
        pair_only.append(1.96 * a.mean(0).std().item() / 40 ** 0.5)
    assert 0.90 <= hits / 300 <= 0.98
    assert statistics.fmean(widths) > 1.5 * statistics.fmean(pair_only)


def test_holm_rejects_in_order_of_p_while_p_stays_under_alpha_over_the_tests_left():
    import common
    # sorted: 0.005 <= 0.05/4 and 0.01 <= 0.05/3 reject; 0.03 > 0.05/2 stops, so 0.04 stands too
    assert common.holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    assert common.holm([0.03, 0.03]) == [False, False] and common.holm([0.02, 0.024]) == [True, True]


@pytest.fixture(scope="module")
def committed_sae_sha256():
    """The sha256 of the SAE committed in benchmarks/sae-gemma-3-270m-L10/, computed from its weights."""
    import local_gemma3
    import torch
    import yapo
    return local_gemma3.sae_fingerprint(yapo.load_sae(str(local_gemma3.SAE_DIR), None, torch.device("cpu"),
                                                      torch.float32))


def test_readme_pretrained_tables_are_the_sweep_report(tmp_path, capsys, monkeypatch, committed_sae_sha256):
    """The two tables of benchmarks/README's "Results on a pretrained model" are what `sweep.py report` writes from the
    committed units, and the committed report is that output: no figure there is typed by hand. The units were
    measured with the committed SAE, and the report's MCQ accuracy over every option order is the units' own."""
    monkeypatch.chdir(ROOT)
    committed = ROOT / "benchmarks" / "results" / "local"
    folder = tmp_path / "sweep"
    shutil.copytree(committed / "sweep", folder, ignore=shutil.ignore_patterns("convergence*"))
    importlib.import_module("sweep").main(["report", "--results", str(folder)])
    written = (tmp_path / "sweep.md").read_text()
    assert written == (committed / "sweep.md").read_text()
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["missing"] == [] and data["units"] == 72
    assert data["sae_sha256"] == committed_sae_sha256
    overview = written.split("## Overview\n")[1].split("\n## ")[0]
    tables = re.findall(r"(?:^\|.*\n)+", overview, re.M)
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    assert len(tables) == 2 and all(t in readme for t in tables)

    # MCQ over every order: each item's share of its cyclic orders answered right, averaged over the seeds, then
    # over the items; and the unsteered model's picks by position, from the none unit at m = 0
    (row,) = [r for r in data["summary"] if (r["behavior"], r["method"]) == ("culture_egypt", "YaPO")]
    units = [json.loads(p.read_text()) for p in sorted((folder / "culture_egypt").glob("YaPO_seed*.json"))]
    at_1 = [next(r for r in u["rows"] if r["multiplier"] == 1.0)["mcq_every_order"]["correct"] for u in units]
    assert len(units) == 3 and close(row["mcq_every_order_at_+1"]["mean"], statistics.fmean(map(statistics.fmean,
                                                                                                  zip(*at_1))))
    none = json.loads((folder / "culture_egypt" / "none.json").read_text())
    picks = next(r for r in none["rows"] if r["multiplier"] == 0)["mcq_every_order"]["position_share"]
    assert row["position_share_unsteered"] == picks and close(sum(picks), 1.0)


def test_readme_knowledge_table_is_the_committed_check_at_the_units_calibrated_multipliers():
    """benchmarks/README's general-knowledge table is results/knowledge_check.json, and its equal-drift columns
    were run at the multipliers the sweep units (beside the vectors) measured for those drifts."""
    runs = json.loads((ROOT / "benchmarks" / "results" / "knowledge_check.json").read_text())["runs"]
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    for vector in ("YaPO", "BiPO"):
        keys = [f"{vector} m={m}" for m in (-1, 0, 1)] + [f"{vector} KL {kl} {side}" for kl in (0.05, 0.2)
                                                           for side in ("minus", "plus")]
        assert "| " + " | ".join([vector] + [f"{runs[k]['acc']:.3f} ± {runs[k]['acc_stderr']:.3f}" for k in keys]) \
            + " |" in readme
        unit = json.loads((ROOT / runs[keys[-1]]["path"]).with_suffix(".json").read_text())
        assert unit["method"] == vector and unit["seed"] == 0 and unit["behavior"] == "power_seeking"
        for k in keys[3:]:
            kl, side = k.split()[2:]
            assert runs[k]["multiplier"] == unit["at_kl"][kl][side]["multiplier"]
            assert abs(runs[k]["drift_kl"] / float(kl) - 1) <= 0.05


def test_readme_llama_cpp_table_is_the_committed_round_trip(committed_sae_sha256):
    """benchmarks/README's llama.cpp table is what llama_cpp_roundtrip.py writes from results/llama_cpp_roundtrip.json,
    each row the mean of its per-prompt figures, measured with the committed SAE (llama.cpp is not needed here)."""
    import llama_cpp_roundtrip
    report = json.loads((ROOT / "benchmarks" / "results" / "llama_cpp_roundtrip.json").read_text())
    assert llama_cpp_roundtrip.markdown(report) in (ROOT / "benchmarks" / "README.md").read_text()
    assert report["sae_sha256"] == committed_sae_sha256
    assert len(report["summary"]) == 6 and report["prompts"] == 24
    for row in report["summary"]:
        run = report["runs"][row["run"]]
        for part in llama_cpp_roundtrip.PARTS.keys() & run.keys():
            per_prompt = run[part]
            assert len(per_prompt["cosine"]) == report["prompts"]
            assert close(row[f"{part} cosine"], statistics.fmean(per_prompt["cosine"]))
            assert close(row[f"{part} top_token_agrees"], statistics.fmean(map(float, per_prompt["top_token_agrees"])))
    kl = report["unsteered"]["kl_llama_from_yapo"]
    assert close(report["unsteered"]["mean_kl"], statistics.fmean(kl)) and min(kl) > -1e-6   # a KL, up to rounding


def test_committed_convergence_summary_is_what_its_runs_give(tmp_path, capsys, monkeypatch, committed_sae_sha256):
    """sweep/convergence.md, which the README's convergence paragraph quotes, is what `sweep.py convergence` writes
    from the committed runs (all 18 there: it trains nothing and loads no model), whose SAE is the committed one (the
    summary names the one SAE of all its runs); the earlier SAE's summary is likewise what its own runs give."""
    monkeypatch.chdir(ROOT)
    sweep = importlib.import_module("sweep")
    for name in ("sweep", "sweep_sae_23a3c121"):
        committed = ROOT / "benchmarks" / "results" / "local" / name
        folder = tmp_path / name
        shutil.copytree(committed / "convergence", folder / "convergence")
        sweep.main(["convergence", "--results", str(folder)])
        assert "ran 0 units, skipped 18 that exist" in capsys.readouterr().out
        assert (folder / "convergence.md").read_text() == (committed / "convergence.md").read_text()
    summary = json.loads((tmp_path / "sweep" / "convergence.json").read_text())
    assert summary["sae_sha256"] == committed_sae_sha256


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
