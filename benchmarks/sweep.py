"""The sweep behind "Results on a pretrained model": the five methods of compare_methods.py (none, CAA, SAS, BiPO,
YaPO) on every behaviour, 3 seeds, on Gemma 3 270M and its SAE (benchmarks/local_gemma3.py), and the paper's
convergence claim tested as stated. It is cut into units that each write their own JSON and are skipped when that
file exists, so that it runs in parts of about an hour, can be stopped at any point (Ctrl-C loses at most the
unit in progress) and continued by running the same command again.

    python benchmarks/sweep.py run [--minutes 60] [--behaviors B ...] [--methods M ...] [--seeds 0 1 2] [--threads 2]
    python benchmarks/sweep.py report        # -> benchmarks/results/local/sweep.json and sweep.md
    python benchmarks/sweep.py convergence [--minutes 60] [--seeds 0 1 2]
    python benchmarks/sweep.py run --tiny    # the same code on the toy, in seconds (also report, convergence)

run: for each seed, behaviour and method, the vector is built on the behaviour's training pairs with the settings
local_gemma3.validate() chose (local_gemma3.chosen_settings(): lambda auto, its lr, epochs and warm-up; SAS at
local_gemma3.SAS_TAU; culture behaviours on their MCQ rows) and evaluated by yapo.evaluate on ALL its held-out
pairs at m = -1, 0, 0.5, 1, 2, 4. The seed changes the training order and the directions d; the held-out pairs
stay fixed (data_sample.jsonl marks every row's split). none, CAA and SAS have no randomness: one unit each per
behaviour (<method>.json), read for every seed. One unit: benchmarks/results/local/sweep/<behaviour>/<method>
[_seed<k>].json, with the evaluate rows (per-pair margins and drifts, MCQ correctness in the listed order and in every
order), lam, build and evaluation seconds and, for BiPO and YaPO, the training loss of every step; beside it the
vector (<unit>.safetensors), so that a new evaluation reads it instead of training again; and under "at_kl" the
held-out pairs evaluated at the multiplier of each sign whose measured drift KL is within 5 % of 0.05 and of 0.2
(compare_methods.calibrated_rows: a search on the drift alone; null where |m| up to M_MAX = 16 does not reach
it). A call starts a unit only while --minutes have not passed and, once it has made a unit of that method, only if
one more such unit would end within them. Two calls on one folder share the work (one per core, --threads 1 each):
a unit that another live call is making is left to it (a marker file, .<unit>.running, names that process).

Every unit records the sha256 of the SAE it used (local_gemma3.sae_fingerprint), and run, convergence and report
refuse a folder whose units come from two SAEs: the local SAE is trained here, and before its build was pinned to
AVX2 kernels a CPU with other kernels trained another one (results/sae_gemma3_270m_first.json against
sae_gemma3_270m.json), so a sweep continued after a rebuild could mix two SAEs unseen.

report: reads whatever units exist (and lists the missing ones) and writes, per behaviour and method, the behaviour
score and margin at m = -1 and +1, the drift KL at +1 and on MCQ rows the accuracy (options as written, and over
every cyclic order of them, with the unsteered model's picks by position), each a mean with a 95 % interval over
the held-out pairs (each pair's value first averaged over the seeds present, then yapo.mean_interval); and per
behaviour YaPO minus CAA, SAS and BiPO at equal drift (KL 0.05 and 0.2: the rows evaluated at each run's
calibrated multiplier, m > 0) with the interval of common.paired_interval (question groups and seeds) and a verdict
after Holm's correction across every comparison of the report: "better", "worse" or "cannot tell at n = N". It
also reads the same units the way they were read before calibration (interpolated on the grid, the interval over
pairs alone, no correction), to show what calibration changes. Units measured before calibration
(results/local/sweep_sae_23a3c121/) are read that older way only.

convergence: YaPO against BiPO on power_seeking, 3 seeds, 10 epochs (120 steps of 4 pairs), at two settings:
  paper    the paper's parametrization: lambda 1, lr 5e-4; its 100 warm-up steps capped at a tenth of this run
  best_lr  each method's own lr, chosen on validation pairs (local_gemma3.validation_split: a quarter of the
           training pairs' groups; candidates 1e-3, 3e-3, 1e-2 at lambda auto, trained as long as the runs, scored
           as local_gemma3.validate() scores: the largest margin gain from m = -1 to +1 whose mean drift at +-1
           stays under 0.5, or the smallest lr if none does), then trained on all training pairs
Per run: steps until the training loss first falls below 0.5, 0.3 (where the paper's BiPO stays) and 0.1, the lowest
loss and the last epoch's mean loss (a step's loss is noisy: 4 pairs, one random d), the held-out margin gain
from m = -1 to +1 with its interval, and the drift at m = +-1; per setting, YaPO's gain minus BiPO's pair by pair
with the paired interval. One JSON per unit in sweep/convergence/ (validation runs too), and the summary
sweep/convergence.json and .md. The paper's claim: YaPO's loss below 0.1 within 150 steps, BiPO above 0.3 after 600.

--tiny: the committed toy of yapo.py --tiny (toy_sentiment, --preset tiny), 1 epoch, 4 held-out pairs: a smoke test
of this script, written to benchmarks/results/quick/sweep/ (git ignores it). --results puts the units elsewhere; the report goes next to that folder (<folder>.json).

Cost on 2 cores, ESTIMATED (the model's SAE folder was not yet built when this was written; every unit records
its own seconds, so the first call measures it): from results/local_train_step.json (2.6 s per training step of 4
pairs, batch 8 x 86 tokens, machine otherwise idle) and results/local_evaluate.json (0.77 s per MCQ pair and
multiplier with 4 options; an open pair needs one sequence fewer, about 0.6 s); the sequences here are as short
(72-132 tokens per pair). 8 behaviours (power_seeking, wealth_seeking, hallucination, jailbreak, sentiment,
culture_morocco, _egypt, _lebanon) x (3 seed-independent units + BiPO and YaPO x 3 seeds) = 72 units:

  unit                                   build                          evaluation              minutes
  BiPO or YaPO, open behaviour           48 steps (sentiment 60): 2-3   44 pairs x 6 m: 2.7     5-6
  BiPO or YaPO, culture (MCQ)            32 steps: 1.5                  40 pairs x 6 m: 3.1     4.6
  CAA or SAS                             one pass over the pairs: 0.3   as above                3-3.5
  none                                   -                              m = 0 once: 0.5         0.5

About 37 minutes per open behaviour, 40 for sentiment, 35 per culture behaviour: about 290 minutes, 5 hours, on
an idle machine, so 5 calls of `run --minutes 60`, each about an hour; when other work shares the 2 cores it
takes longer (the earlier one-seed runs, at load 3, took 2.4 times the idle step time: about 12 hours, 12 calls).
convergence: 18 units (12 runs of 120 steps on the 46 training pairs, 6 validation runs of 90 steps on 34 of
them), each evaluated at 3 multipliers (44 or 12 pairs): about 6.7, 4.3 and 6.7 minutes per run of paper,
validation and best_lr, 105 minutes in all on an idle machine (2 calls of `convergence --minutes 60`; about 4
hours shared). Loading the model and SAE: under a minute per call.

MEASURED on the first SAE, on sentiment (the 9 units in 48 minutes, 2 cores, now and then shared with lighter work):
BiPO and YaPO 3.7-4.1 minutes to build (60 steps: 3.7-4.1 s a step, not 2.6) and 2.4-2.7 to evaluate, 6.1-6.6 in
all; CAA 5.3 (1.3 + 4.0, the cores shared), SAS 3.3 (0.5 + 2.8), none 0.8. On power_seeking (36 minutes): BiPO and
YaPO 4.7-4.9 minutes (48 steps at 2.3-2.6 s, then 2.7-3.0 to evaluate), CAA 3.3, SAS 3.2, none 0.6. So about 1.1
times the estimate: some 5½ hours for the whole sweep and 2 for convergence on idle cores.
MEASURED with the committed SAE and calibration (results/local/sweep/, an Intel Xeon of 2 cores): on idle cores
none 0.4 minutes, SAS 4.7 (0.2 to build, 2.1 to evaluate the grid, 2.5 to calibrate), BiPO and YaPO on wealth_seeking
5.5-5.8 (1.1-1.3 to build, 2.1 to evaluate, 2.3-2.5 to calibrate); with the cores shared, 1.5 to 2 times that (the
first power_seeking units). Each MCQ item is now asked in every order of its options. Plan on about 6 minutes a
trained unit and 6 to 7 hours for the 72 units on idle cores. With --threads 1 while other torch work ran on the
second core: 15 to 20 minutes a unit (hallucination BiPO and YaPO, jailbreak CAA). Convergence, in two calls of
--threads 1 side by side: 6.3 to 8.5 minutes to train a 120-step run, 4.6 to 5 a 90-step validation run.
MEASURED with the SAE 23a3c121 before calibration (results/local/sweep_sae_23a3c121/, 2 AMD EPYC cores, idle; each
unit's seconds are in its JSON): BiPO and YaPO on an open behaviour 1.5-3.7 minutes to build (48 steps; sentiment 60) and 2.1-4.9 to
evaluate, 4-6.5 in all; on a culture behaviour 1.5-2 and 2.6-3.5, 4-5 in all; CAA and SAS 0.2-0.3 to build and
2.3-4.3 to evaluate (two units with the cores shared: 2.1 to build, 6.7 to evaluate); none 0.4-1.8. Seed 0 with the
24 seed-independent units: 181 minutes (163 without one BiPO unit that shared the cores with another torch process
and took 27 minutes: never run two at once on 2 cores); seeds 1 and 2 (16 units each) about 76 each: 333 minutes for
the whole sweep. Convergence, measured here: a paper run 4.5-5.3 minutes to train (120 steps) and about 6 in all, a
validation run 3.5-4 to train (90 steps) and about 4 in all, a best_lr run 4.5 to train and about 6 in all: about
1.7 hours for the 18 units.

What is reused: the model and SAE are loaded once per process (and only when a unit needs them, so a call that
finds everything done loads nothing); none, CAA and SAS once per behaviour for every seed; the reference log-probs
log p_0(y|x) of the training pairs once per behaviour and call, for every BiPO and YaPO unit (yapo.train's
`reference`). Not cached: evaluate's unsteered next-token distributions (one prompt pass per unit).
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import common  # first: puts the repository root on sys.path and silences progress bars

import bench_convergence  # noqa: E402
import compare_methods  # noqa: E402
import local_gemma3  # noqa: E402
import torch  # noqa: E402
import yapo  # noqa: E402

METHODS = compare_methods.METHODS                   # none, CAA, SAS, BiPO, YaPO
SEED_INDEPENDENT = ("none", "CAA", "SAS")           # no randomness in how they are built: one unit per behaviour
TRAINED = ("BiPO", "YaPO")
MULTIPLIERS = [-1.0, 0.0, 0.5, 1.0, 2.0, 4.0]
KLS = [0.05, 0.2]                                   # equal drift: where YaPO is compared with each baseline
M_MAX = 16.0                                        # calibration: a drift no |m| up to this reaches is "not reached"
BASELINES = ("CAA", "SAS", "BiPO")                  # none never drifts, so it never reaches an equal drift
# sentiment is the behaviour written for the pretrained model, after local_gemma3.py's one-seed tables were made:
# their list does not hold it
LOCAL_BEHAVIORS = local_gemma3.BEHAVIORS | {"sentiment": local_gemma3.BEHAVIORS.get("sentiment", [])}
CONVERGENCE = {"behavior": "power_seeking", "epochs": 10, "loss_thresholds": [0.5, 0.3, 0.1], "warmup_share": 0.1,
               "paper": {"lam": "1", "lr": 5e-4, "warmup_steps": 100},          # the paper's Table 6
               "lrs": [1e-3, 3e-3, 1e-2], "lam": "auto", "validation_share": 0.25, "max_drift": 0.5,
               "multipliers": [-1.0, 0.0, 1.0]}


@dataclasses.dataclass
class Where:
    """What the commands run on: the local model or the toy, and the folder of their units."""
    tiny: bool
    folder: Path
    flags: list                 # yapo.py flags of every unit
    behaviors: dict             # behaviour -> its own extra flags (culture: --format mcq)
    max_test_pairs: int | None  # None: all held-out pairs
    convergence: dict


def where(tiny, results=None):
    results = results and Path(results).resolve()
    os.chdir(common.ROOT)       # as local_gemma3.compare_all: the JSON names the folders as a clone has them
    if tiny:
        return Where(True, results or common.RESULTS / "quick" / "sweep", ["--tiny", "--epochs", "1"],
                     {"toy_sentiment": []}, 4, CONVERGENCE | {"behavior": "toy_sentiment", "epochs": 1})
    folder = results or common.RESULTS / "local" / "sweep"
    flags = [os.path.relpath(f) if f.startswith(str(common.ROOT)) else f for f in local_gemma3.FLAGS]
    return Where(False, folder,
                 flags + local_gemma3.chosen_settings() + ["--sas-tau", str(local_gemma3.SAS_TAU)],
                 LOCAL_BEHAVIORS, None, CONVERGENCE)


# ---------------------------------------------------------------------------------------------- units

def unit_args(env, behavior, method, seed, extra=()):
    """yapo.Args of one unit, from yapo.py's own parser (as compare_methods.yapo_args): later flags win."""
    argv = env.flags + env.behaviors[behavior] + [
        "--behavior", behavior, "--seed", str(seed or 0), "--n-generations", "0", "--max-new-tokens", "1",
        "--multipliers", *map(str, MULTIPLIERS)] + list(extra)
    return yapo.parse_args(common.with_method(argv, compare_methods.METHOD[method]))


def pairs(env, behavior):
    """(training pairs, held-out pairs): the same for every seed, since every row names its split."""
    train, test = yapo.load_pairs(unit_args(env, behavior, "YaPO", 0))
    return train, test[:env.max_test_pairs]


class Loaded:
    """The model, tokenizer and SAE, loaded when the first unit needs them and kept for the process (the toy is
    built on a behaviour's training pairs, so once per behaviour)."""

    def __init__(self, env):
        self.env, self.key, self.value, self.references, self.sae_sha256 = env, None, None, {}, None

    def reference(self, behavior, model, tok, train, args):
        """The training pairs' reference log-probs, once per behaviour and process: every BiPO and YaPO unit of a
        behaviour trains on the same pairs with the same frozen model (yapo.train(..., reference=...))."""
        if behavior not in self.references:
            self.references[behavior] = yapo.reference_logprobs(model, tok, train, args)
        return self.references[behavior]

    def get(self, behavior):
        key = behavior if self.env.tiny else "local"
        if key != self.key:
            args = unit_args(self.env, behavior, "YaPO", 0)
            t0 = time.perf_counter()
            model, tok, sae = yapo.setup(args)
            print(f"loaded {args.model} and its SAE in {time.perf_counter() - t0:.0f} s", flush=True)
            self.key, self.value = key, (model, tok, sae, args.layer, args.model, args.sae)
            self.sae_sha256 = local_gemma3.sae_fingerprint(sae)
            one_sae([{"sae_sha256": self.sae_sha256}] + [json.loads(p.read_text())
                                                         for p in self.env.folder.rglob("*.json")], self.env.folder)
        return self.value


def one_sae(units, folder):
    """The units' SAE fingerprint; refuses units made with different SAEs (units from before fingerprints were
    recorded count as one SAE of their own)."""
    seen = Counter(u.get("sae_sha256", "not recorded") for u in units)
    if len(seen) > 1:
        raise SystemExit(f"{folder}: its units were made with {len(seen)} different SAEs ({dict(seen)}): they "
                         f"cannot be read together. Keep one SAE's units (move the others out of the folder) and run "
                         f"the missing units again with that SAE.")
    return next(iter(seen), None)


class Budget:
    """--minutes: a unit starts while the limit has not passed, and not if the last unit of its kind in this call
    took longer than the time left."""

    def __init__(self, minutes):
        self.end, self.last = time.monotonic() + 60 * minutes, {}

    def allows(self, kind):
        return time.monotonic() + self.last.get(kind, 0.0) <= self.end

    def record(self, kind, seconds):
        self.last[kind] = seconds


def write_atomically(path, data):
    """The whole file or none of it: a stopped run never leaves a half-written unit that would be skipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def claim(path):
    """The marker that lets this process make the unit at `path`, or None if another live process holds it: two
    calls on one folder (one per core) then never make the same unit. A marker whose process has ended is taken."""
    marker = path.with_name(f".{path.name}.running")
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)         # atomic: one process wins
        except FileExistsError:
            try:
                os.kill(int(marker.read_text()), 0)                            # raises if it has ended
            except ProcessLookupError:
                marker.unlink(missing_ok=True)                                 # left by a stopped call
                continue
            except (ValueError, FileNotFoundError, PermissionError):
                pass                                                           # being written, or just done
            return None
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return marker
    return None


def unit(path, make, budget, kind, tally):
    """A unit's JSON: read back if it exists, else made and written (if the budget allows and no other call is making
    it); None if not started."""
    if path.exists():
        tally["skipped"] += 1
        return json.loads(path.read_text())
    if not budget.allows(kind):
        tally["not started"] += 1
        return None
    marker = claim(path)
    if marker is None or path.exists():                        # another call makes it, or has just made it
        if marker is not None:
            marker.unlink()
        done = path.exists()
        tally["skipped" if done else "made by another call"] += 1
        return json.loads(path.read_text()) if done else None
    try:
        t0 = time.perf_counter()
        data = make()
        budget.record(kind, time.perf_counter() - t0)
        write_atomically(path, data)
    finally:
        marker.unlink(missing_ok=True)
    tally["ran"] += 1
    print(f"  -> {path}", flush=True)
    return data


def busy(tally):
    n = tally["made by another call"]
    return f", {n} being made by another call (run again once it ends)" if n else ""


def plan(behaviors, methods, seeds):
    """(behaviour, method, seed) in the order run makes them: seed by seed, so that a sweep stopped early has whole
    seeds; a seed-independent method once, with the first seed (seed None)."""
    out = []
    for seed in seeds:
        for behavior in behaviors:
            for method in methods:
                u = (behavior, method, None if method in SEED_INDEPENDENT else seed)
                if u not in out:
                    out.append(u)
    return out


def unit_path(folder, behavior, method, seed):
    return folder / behavior / (f"{method}.json" if seed is None else f"{method}_seed{seed}.json")


def build(method, model, tok, sae, train, args, tiny, reference=None):
    """compare_methods.build, except that BiPO and YaPO keep the loss of every training step (and take the
    reference log-probs computed once for the behaviour)."""
    if method not in TRAINED:
        return compare_methods.build(method, model, tok, sae, train, args, tiny, sas_tau_given=not tiny)
    hook_sae = sae if method == "YaPO" else None
    v, history = yapo.train(model, tok, hook_sae, train, args, reference=reference)
    return v, hook_sae, {"steps": len(history), "final_loss": history[-1]["loss"],
                         "losses": [round(h["loss"], 5) for h in history]}


def sweep_unit(env, loaded, behavior, method, seed, path):
    """One method on one behaviour at one seed: built on the training pairs, evaluated on every held-out pair. Its
    vector is saved beside its JSON (path, as .safetensors), so that a new evaluation reads it instead of training."""
    train, test = pairs(env, behavior)
    model, tok, sae, layer, model_name, sae_name = loaded.get(behavior)
    args = unit_args(env, behavior, method, seed)
    args = dataclasses.replace(args, layer=layer)                  # the layer the loaded SAE reads
    if method == "none":
        args = dataclasses.replace(args, lam=1.0)                  # v = 0: lam changes nothing
    if args.lam == "auto":                                         # per method: latents and h differ in scale
        args = dataclasses.replace(args, lam=yapo.auto_lam(model, tok, sae if yapo.uses_sae(args.method) else None,
                                                           train, args))
    t0 = time.perf_counter()                                       # the first trained unit also pays for p_0
    reference = loaded.reference(behavior, model, tok, train, args) if method in TRAINED else None
    v, hook_sae, extra = build(method, model, tok, sae, train, args, env.tiny, reference)
    built = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    yapo.save_vector(path.with_suffix(".safetensors"), v, args, hook_sae)
    t0 = time.perf_counter()
    if method == "none":                                           # v = 0: every m gives m = 0's numbers
        row = yapo.evaluate(model, tok, None, v, test, dataclasses.replace(args, multipliers=[0.0]))["rows"][0]
        rows = [row | {"multiplier": m} for m in MULTIPLIERS]
    else:
        rows = yapo.evaluate(model, tok, hook_sae, v, test, args)["rows"]
    evaluated = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibrated = (compare_methods.calibrated_rows(model, tok, hook_sae, v, test, args, KLS, M_MAX)
                  if method != "none" else {})
    print(f"{behavior} {method} seed {seed if seed is not None else '-'}: built in {built:.0f} s, evaluated in "
          f"{evaluated:.0f} s, calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"behavior": behavior, "method": method, "seed": seed, "mode": args.method, "tiny": env.tiny,
            "setup": f"{model_name}, SAE {sae_name}, layer {layer}", "sae_sha256": loaded.sae_sha256,
            "lam": float(args.lam), "build_seconds": built, "evaluate_seconds": evaluated,
            "l0": int((v != 0).sum()), "norm": v.norm().item(),
            **extra, "train_pairs": len(train), "test_pairs": len(test), "multipliers": MULTIPLIERS,
            "rows": rows, "at_kl": calibrated, "m_max": M_MAX,
            "at_kl_interpolated": {str(kl): compare_methods.at_kl(rows, kl) for kl in KLS},
            "args": dataclasses.asdict(args), "machine": common.machine()}


def run(env, behaviors, methods, seeds, minutes):
    budget, tally, loaded = Budget(minutes), Counter(), Loaded(env)
    for behavior, method, seed in plan(behaviors, methods, seeds):
        path = unit_path(env.folder, behavior, method, seed)
        unit(path,
             lambda: sweep_unit(env, loaded, behavior, method, seed, path), budget, method, tally)
    print(f"ran {tally['ran']} units, skipped {tally['skipped']} that exist, {tally['not started']} not started "
          f"(--minutes {minutes:g})" + busy(tally) + f" in {env.folder}")
    return tally


# ---------------------------------------------------------------------------------------------- report

def per_pair(entry, metric, where):
    """One run's per-pair values of metric at m = where, or where = ("kl", x) at equal drift; None if not reached."""
    if metric in ("drift_kl", "mcq_every_order"):
        row = next(r for r in entry["rows"] if r["multiplier"] == where)
        got = row["per_pair"]["drift_kl"] if metric == "drift_kl" else row["mcq_every_order"]["correct"]
        return torch.tensor(got, dtype=torch.float64)
    return compare_methods.per_pair_at(entry, metric, where)


def seed_mean(entries, metric, where):
    """Per-pair values averaged over the runs (seeds) that reach `where`, and how many did."""
    got = [x for x in (per_pair(e, metric, where) for e in entries) if x is not None]
    return (torch.stack(got).mean(0) if got else None), len(got)


def interval(values):
    if values is None:
        return None
    mean, ci = yapo.mean_interval(values)
    return {"mean": mean, "ci95": ci}


def verdict(mean, ci, n):
    return "better" if mean - ci > 0 else "worse" if mean + ci < 0 else f"cannot tell at n = {n}"


def seeds_of(entries):
    return "seed-independent" if entries[0]["seed"] is None else ", ".join(str(e["seed"]) for e in entries)


SUMMARY = [("behavior_score", -1.0), ("behavior_score", 1.0), ("margin", -1.0), ("margin", 1.0), ("drift_kl", 1.0)]
SUMMARY_MCQ = [("mcq_accuracy", -1.0), ("mcq_accuracy", 1.0)]
SUMMARY_ANY_ORDER = [("mcq_every_order", -1.0), ("mcq_every_order", 1.0)]  # units measured before it lack it


def mcq_summary(row):
    """The MCQ columns a unit's evaluate row supports: none, accuracy, or accuracy and accuracy over every order."""
    return SUMMARY_MCQ * ("mcq" in row) + SUMMARY_ANY_ORDER * ("mcq_every_order" in row)


def key(metric, m):
    return f"{metric}_at_{m:+g}"


def summary_row(behavior, method, entries):
    unsteered = next(r for r in entries[0]["rows"] if r["multiplier"] == 0)
    return {"behavior": behavior, "method": method, "seeds": seeds_of(entries), "n": entries[0]["test_pairs"],
            "position_share_unsteered": unsteered.get("mcq_every_order", {}).get("position_share"),
            "lam": statistics.fmean(e["lam"] for e in entries),
            "build_seconds": statistics.fmean(e["build_seconds"] for e in entries)} | {
        key(metric, m): interval(seed_mean(entries, metric, m)[0])
        for metric, m in SUMMARY + mcq_summary(entries[0]["rows"][0])}


def paired_rows(behavior, runs, kls):
    """YaPO minus each baseline on the same held-out pairs, at each equal drift, per metric."""
    metrics = ["behavior_score", "margin"] + ["mcq_accuracy"] * ("mcq" in runs["YaPO"][0]["rows"][0])
    out = []
    for other in (b for b in BASELINES if b in runs):
        for kl in kls:
            for metric in metrics:
                a, n_a = seed_mean(runs["YaPO"], metric, ("kl", kl))
                b, n_b = seed_mean(runs[other], metric, ("kl", kl))
                row = {"behavior": behavior, "comparison": f"YaPO - {other}", "at": f"KL {kl:g}", "metric": metric,
                       "runs_reaching": f"{n_a}/{len(runs['YaPO'])} vs {n_b}/{len(runs[other])}"}
                if a is None or b is None:
                    out.append(row | {"difference": "not reached", "ci95": None, "n": None, "verdict": None})
                    continue
                mean, ci = yapo.mean_interval(a - b)
                out.append(row | {"difference": mean, "ci95": ci, "n": len(a), "verdict": verdict(mean, ci, len(a))})
    return out


def calibrated(entry):
    """Whether a unit holds rows at calibrated drifts (at_kl: {kl: {"plus": row, "minus": row}}), not the
    interpolated points of the units measured before calibration."""
    return all(isinstance(sides, dict) and "plus" in sides for sides in entry["at_kl"].values())


def calibrated_paired_rows(behavior, runs, kls, clusters):
    """YaPO minus each baseline at each equal drift (m > 0), per metric, from the rows evaluated at each run's
    calibrated multiplier: common.paired_interval over question groups and seeds, with its p-value for Holm's
    correction (report). Metrics: score and margin; on MCQ behaviours the accuracy over every order of the options
    too."""
    mcq = "mcq" in runs["YaPO"][0]["rows"][0]
    metrics = ["behavior_score", "margin"] + ["mcq_every_order"] * mcq
    values = lambda row, metric: (torch.tensor(row["mcq_every_order"]["correct"], dtype=torch.float64)
                                  if metric == "mcq_every_order" else compare_methods.per_pair(row, metric))
    out = []
    for other in (b for b in BASELINES if b in runs):
        for kl in kls:
            reach = {m: [e["at_kl"][str(kl)]["plus"] for e in runs[m] if e["at_kl"][str(kl)]["plus"]]
                     for m in ("YaPO", other)}
            for metric in metrics:
                row = {"behavior": behavior, "comparison": f"YaPO - {other}", "at": f"KL {kl:g}", "metric": metric,
                       "runs_reaching": f"{len(reach['YaPO'])}/{len(runs['YaPO'])} vs "
                                        f"{len(reach[other])}/{len(runs[other])}"}
                if not reach["YaPO"] or not reach[other]:
                    out.append(row | {"difference": "not reached", "ci95": None, "n": None, "p": None, "verdict": None})
                    continue
                a, b = (torch.stack([values(r, metric) for r in reach[m]]) for m in ("YaPO", other))
                cl = clusters if metric != "mcq_every_order" else [c for c, p in clusters.mcq]
                out.append(row | common.paired_interval(a, b, cl) | {"n": a.shape[1]})
    return out


def holm_verdicts(paired, alpha=0.05):
    """Every comparison that was reached gets a verdict after Holm's correction across all of them
    (common.holm_verdicts), and beside it whether its interval excludes 0 before the correction."""
    tested = common.holm_verdicts([r for r in paired if r.get("p") is not None], alpha)
    for r in tested:
        r["uncorrected"] = "excludes 0" if abs(r["difference"]) > r["ci95"] else "contains 0"
    return len(tested)


def pm(cell, style=".3f"):
    """A mean and its interval: '0.612 ± 0.041'."""
    return "-" if cell is None else f"{cell['mean']:{style}} ± {cell['ci95']:{style}}"


LABELS = {"behavior_score": ("score", ".3f"), "margin": ("margin", ".2f"), "drift_kl": ("drift KL", ".2g"),
          "mcq_accuracy": ("MCQ acc", ".3f"), "mcq_every_order": ("MCQ any order", ".3f")}


def overview(summary, paired, kls):
    """The README's two tables: every method on every behaviour, then YaPO's verdicts at equal drift."""
    styles = [".3f", ".3f", ".1f", ".1f", ".2f"]                    # score, score, margin, margin, drift KL
    cells = [{"behavior": f"{r['behavior']} ({r['n']})", "method": r["method"],
              "seeds": "-" if r["seeds"] == "seed-independent" else r["seeds"]}
             | {key(m, x): pm(r[key(m, x)], style) for (m, x), style in zip(SUMMARY, styles)} for r in summary]
    columns = [("behavior", "behaviour (held-out pairs)"), ("method", "method"), ("seeds", "seeds")]
    columns += [(key(m, x), f"{LABELS[m][0]} m = {x:+g}") for m, x in SUMMARY]
    return [common.markdown_table(cells, columns), "", "YaPO minus each baseline at equal drift (± the paired 95 % "
            "interval, before correction; 'better' or 'worse' only where the difference survives Holm's correction, "
            "so an interval that excludes 0 can still read 'cannot tell'; n as in the table above):", "",
            verdict_table(paired, kls), ""]


def verdict_table(paired, kls):
    """One line per behaviour and baseline: YaPO's difference, interval and verdict on score and margin per KL."""
    verdicts = {}
    for r in (r for r in paired if r["metric"] in ("behavior_score", "margin")):
        row = verdicts.setdefault((r["behavior"], r["comparison"]),
                                  {"behavior": r["behavior"], "comparison": r["comparison"].removeprefix("YaPO - ")})
        style = ".3f" if r["metric"] == "behavior_score" else ".2f"
        row[r["metric"], r["at"]] = (f"not reached ({r['runs_reaching']})" if r["verdict"] is None else
                                     f"{r['difference']:+{style}} ± {r['ci95']:{style}}: "
                                     + r["verdict"].split(" at ")[0])
    columns = [("behavior", "behaviour"), ("comparison", "YaPO minus")]
    columns += [((m, f"KL {kl:g}"), f"{LABELS[m][0]} at KL {kl:g}") for kl in kls for m in ("behavior_score", "margin")]
    return common.markdown_table(list(verdicts.values()), columns)


INTERPOLATED_NOTE = (
    "The same units read as before calibration, to show what calibration and the new intervals change: each pair's "
    "value interpolated linearly in m between the two grid multipliers around the KL (m >= 0), averaged over the "
    "seeds, the paired interval over pairs alone (1.96 standard errors), and 'better' or 'worse' wherever that "
    "interval excludes 0, with no correction for the number of comparisons:")


def report_markdown(env, summary, paired, missing, seeds, note, kls, interpolated=()):
    lines = [f"# The sweep: five methods, seeds {seeds}" + (" (the toy: a smoke test)" if env.tiny else ""), "",
             note, "", "## Overview", ""] + overview(summary, paired, kls)
    if interpolated:
        lines += ["## Interpolated from the grid, as before calibration", "", INTERPOLATED_NOTE, "",
                  verdict_table(interpolated, kls), ""]
    for behavior in dict.fromkeys(r["behavior"] for r in summary):
        rows = [r for r in summary if r["behavior"] == behavior]
        shown = SUMMARY + [(m, x) for m, x in SUMMARY_MCQ + SUMMARY_ANY_ORDER if key(m, x) in rows[0]]
        columns = [("method", "method"), ("seeds", "seeds"), ("n", "n"), ("lam", "lam")]
        columns += [(key(m, x), f"{LABELS[m][0]} m={x:+g}") for m, x in shown]
        cells = [{k: r[k] for k in ("method", "seeds", "n", "lam")}
                 | {key(m, x): pm(r[key(m, x)], LABELS[m][1]) for m, x in shown} for r in rows]
        lines += [f"## {behavior}", "", common.markdown_table(cells, columns), ""]
        if rows[0]["position_share_unsteered"]:                    # what the accuracy over every order averages out
            lines += ["MCQ acc: the options in their written order; MCQ any order: each item scored over every cyclic "
                      "order of its options (free of position bias; one that always picks one position scores "
                      "chance). The unsteered model picks, by position: " + ", ".join(
                          f"{chr(65 + j)} {x:.2f}" for j, x in enumerate(rows[0]["position_share_unsteered"])) + ".",
                      ""]
        mine = [r for r in paired if r["behavior"] == behavior]
        if mine:
            lines += ["YaPO minus each baseline at equal drift, on the same held-out pairs:", "",
                      common.markdown_table(mine, [("comparison", "comparison"), ("at", "at"), ("metric", "metric"),
                                                   ("difference", "difference"), ("ci95", "± (95 %)"), ("n", "n"),
                                                   ("runs_reaching", "runs reaching it"), ("verdict", "verdict")]), ""]
    lines += ["## Missing units", ""] + ([f"- {m}" for m in missing] or ["none"]) + [""]
    return "\n".join(lines)


def report(env, behaviors, seeds, kls):
    found, missing = {}, []
    for behavior, method, seed in plan(behaviors, METHODS, seeds):
        path = unit_path(env.folder, behavior, method, seed)
        if path.exists():
            found[behavior, method, seed] = json.loads(path.read_text())
        else:
            missing.append(str(path.relative_to(env.folder)))
    sae_sha256 = one_sae(found.values(), env.folder)
    summary, paired, interpolated = [], [], []
    for behavior in behaviors:
        runs = {m: [e for (b, mm, _), e in found.items() if (b, mm) == (behavior, m)] for m in METHODS}
        runs = {m: entries for m, entries in runs.items() if entries}
        summary += [summary_row(behavior, m, entries) for m, entries in runs.items()]
        if "YaPO" in runs and all(calibrated(e) for entries in runs.values() for e in entries):
            measured = [kl for kl in kls if str(kl) in runs["YaPO"][0]["at_kl"]]    # the drifts calibrated for
            clusters = compare_methods.Clusters(pairs(env, behavior)[1])
            paired += calibrated_paired_rows(behavior, runs, measured, clusters)
            interpolated += paired_rows(behavior, runs, kls)                 # the same units, read the old way
        elif "YaPO" in runs:
            paired += paired_rows(behavior, runs, kls)
    family = holm_verdicts(paired) if any("p" in r for r in paired) else None
    setup = next(iter(found.values()))["setup"] if found else None
    note = ((common.TINY_NOTE + " " if env.tiny else "") + f"{setup}. Each cell: the mean over the held-out pairs "
            f"(n) and its 95 % interval (1.96 standard errors), each pair's value first averaged over the seeds "
            f"present, so that the interval is over pairs, not over seeds. none, CAA and SAS have no randomness: one "
            f"run each, for every seed. Equal drift: each pair's value where that run's drift KL reaches the KL, "
            f"interpolated between the two multipliers around it (m >= 0); runs that never reach it are left out, "
            f"'runs reaching it' counts them. {len(found)} units read, {len(missing)} missing.")
    if family is not None:
        note = ((common.TINY_NOTE + " " if env.tiny else "") + f"{setup}. Each cell of the method tables: the mean "
                f"over the held-out pairs (n) and 1.96 standard errors, each pair first averaged over the seeds. "
                f"none, CAA and SAS have no randomness: one run each, for every seed. Equal drift: each run evaluated "
                f"at the multiplier (m > 0) whose measured drift KL is within 5 % of the KL (yapo.multiplier_for_drift;"
                f" not reached past m = {M_MAX:g}). YaPO minus a baseline: the mean over the pairs reached, with a 95 "
                f"% interval that counts question groups and seeds (common.paired_interval: a cluster-robust variance "
                f"over the groups of pairs, both forms of a culture question together, plus the variance of each "
                f"method's run means over its runs; Student's t, Welch-Satterthwaite degrees of freedom), and a "
                f"verdict after Holm's correction across the {family} comparisons of this report (family-wise level "
                f"0.05). {len(found)} units read, {len(missing)} missing.")
    results = {"benchmark": "sweep", "tiny": env.tiny, "setup": setup, "sae_sha256": sae_sha256, "seeds": seeds,
               "multipliers": MULTIPLIERS,
               "kls": kls, "units": len(found), "missing": missing, "summary": summary, "paired": paired,
               "note": note} | ({"comparisons": family, "correction": "Holm", "interpolated": interpolated}
                                if family is not None else {})
    out = env.folder.with_suffix(".json")
    common.write_json(out, results)
    out.with_suffix(".md").write_text(report_markdown(env, summary, paired, missing, seeds, note, kls, interpolated))
    print(f"wrote {out.with_suffix('.md')}" + (f"; {len(missing)} units missing" if missing else ""))
    return results


# ---------------------------------------------------------------------------------------------- convergence

def convergence_args(env, method, seed, lam, lr, warmup_steps):
    conf = env.convergence
    return unit_args(env, conf["behavior"], method, seed, [
        "--lam", str(lam), "--lr", str(lr), "--epochs", str(conf["epochs"]), "--warmup-steps", str(warmup_steps),
        "--multipliers", *map(str, conf["multipliers"])])


def warmup(env, n_train):
    """The paper's 100 warm-up steps, capped at a tenth of this run: a run here has 120 steps in all, and a warm-up
    over most of it would leave the lr below its value for most of the run (a tenth, as validate() warms up)."""
    conf = env.convergence
    steps = conf["epochs"] * math.ceil(n_train / 4)                 # batch 4, one micro-batch per step
    return min(conf["paper"]["warmup_steps"], max(1, round(conf["warmup_share"] * steps)))


def convergence_unit(env, loaded, setting, method, seed, lam, lr, train, test):
    """One training run: how fast its loss falls, and the margin it gains on `test` from m = -1 to +1."""
    model, tok, sae, layer, model_name, sae_name = loaded.get(env.convergence["behavior"])
    args = convergence_args(env, method, seed, lam, lr, warmup(env, len(train)))
    args = dataclasses.replace(args, layer=layer)
    hook_sae = sae if method == "YaPO" else None
    if args.lam == "auto":
        args = dataclasses.replace(args, lam=yapo.auto_lam(model, tok, hook_sae, train, args))
    t0 = time.perf_counter()
    v, history = yapo.train(model, tok, hook_sae, train, args)
    seconds = time.perf_counter() - t0
    rows = yapo.evaluate(model, tok, hook_sae, v, test, args)["rows"]
    by_m = {r["multiplier"]: r for r in rows}
    gain = (torch.tensor(by_m[1.0]["per_pair"]["margin"], dtype=torch.float64)
            - torch.tensor(by_m[-1.0]["per_pair"]["margin"], dtype=torch.float64))
    losses = [h["loss"] for h in history]
    mean, ci = yapo.mean_interval(gain)
    print(f"{setting} {method} seed {seed}: lr {lr:g}, lam {args.lam:.3g}, lowest loss {min(losses):.3f}, "
          f"margin gain {mean:+.2f} ± {ci:.2f} ({seconds:.0f} s)", flush=True)
    return {"setting": setting, "method": method, "seed": seed, "behavior": args.behavior, "lr": lr,
            "lam": float(args.lam), "epochs": args.epochs, "warmup_steps": args.warmup_steps, "steps": len(losses),
            "train_seconds": seconds, "setup": f"{model_name}, SAE {sae_name}, layer {layer}",
            "sae_sha256": loaded.sae_sha256,
            **{f"steps_to_loss_below_{t}": bench_convergence.first_step(losses, lambda x: x < t)
               for t in env.convergence["loss_thresholds"]},
            "min_loss": min(losses), "losses": [round(x, 5) for x in losses],
            "margin_gain": mean, "margin_gain_ci95": ci, "per_pair_margin_gain": gain.tolist(),
            "drift_at_1": by_m[1.0]["drift_kl"], "drift_at_minus_1": by_m[-1.0]["drift_kl"],
            "train_pairs": len(train), "test_pairs": len(test), "rows": rows, "machine": common.machine()}


def best_lr(runs, max_drift):
    """local_gemma3.validate()'s rule for one method: the largest margin gain among the lrs whose mean drift at
    m = +-1 stays under max_drift (else the smallest lr)."""
    drift = lambda r: (r["drift_at_1"] + r["drift_at_minus_1"]) / 2
    allowed = [r for r in runs if drift(r) <= max_drift] or [min(runs, key=lambda r: r["lr"])]
    return max(allowed, key=lambda r: r["margin_gain"])["lr"]


def convergence(env, seeds, minutes):
    conf, folder = env.convergence, env.folder / "convergence"
    budget, tally, loaded = Budget(minutes), Counter(), Loaded(env)
    train, test = pairs(env, conf["behavior"])
    fit, val = local_gemma3.validation_split(train, conf["validation_share"])
    runs = []

    def one(setting, method, seed, lam, lr, on=(train, test), name=None):
        path = folder / (name or f"{setting}_{method}_seed{seed}.json")
        r = unit(path, lambda: convergence_unit(env, loaded, setting, method, seed, lam, lr, *on), budget,
                 setting, tally)
        if r is not None:
            runs.append(r)
        return r

    for seed in seeds:                                             # the paper's parametrization
        for method in TRAINED:
            one("paper", method, seed, conf["paper"]["lam"], conf["paper"]["lr"])
    chosen = {}
    for method in TRAINED:                                         # each method's own lr, on validation pairs
        found = [one("validation", method, 0, conf["lam"], lr, (fit, val), f"validation_{method}_lr{lr:g}.json")
                 for lr in conf["lrs"]]
        if None not in found:
            chosen[method] = best_lr(found, conf["max_drift"])
    for seed in seeds:
        for method in chosen:
            one("best_lr", method, seed, conf["lam"], chosen[method])
    print(f"ran {tally['ran']} units, skipped {tally['skipped']} that exist, {tally['not started']} not started "
          f"(--minutes {minutes:g})" + busy(tally) + f" in {folder}")
    return convergence_summary(env, runs, chosen, seeds, len(fit), len(val), one_sae(runs, folder))


def seed_mean_gains(runs):
    """Each held-out pair's margin gain, averaged over the runs' seeds: [n pairs]."""
    return torch.tensor([r["per_pair_margin_gain"] for r in runs], dtype=torch.float64).mean(0)


def convergence_row(setting, method, runs, thresholds):
    """One line of the convergence table: runs of one setting and method (seeds, or one validation run)."""
    got = lambda k: [r[k] for r in runs]

    def steps_below(t):     # from each run's losses, so that a threshold added later reads the runs already made
        steps = [bench_convergence.first_step(r["losses"], lambda x: x < t) for r in runs]
        hit = [s for s in steps if s is not None]
        return {"per_seed": steps, "reached": f"{len(hit)}/{len(runs)}", "mean": statistics.fmean(hit) if hit else None}

    # a step's loss is 4 pairs at one random d, so it is noisy: the mean over the last epoch says where a run ended
    last_epoch = [statistics.fmean(r["losses"][-math.ceil(r["train_pairs"] / 4):]) for r in runs]
    return ({"setting": setting, "method": method, "lr": runs[0]["lr"], "lam": statistics.fmean(got("lam")),
             "seeds": ", ".join(map(str, got("seed"))), "steps": runs[0]["steps"]}
            | {f"steps_to_loss_below_{t}": steps_below(t) for t in thresholds}
            | {"min_loss": {"per_seed": got("min_loss"), "mean": statistics.fmean(got("min_loss"))},
               "last_epoch_loss": {"per_seed": last_epoch, "mean": statistics.fmean(last_epoch)},
               "margin_gain": interval(seed_mean_gains(runs)), "n": runs[0]["test_pairs"],
               "drift_at_pm1": statistics.fmean((r["drift_at_1"] + r["drift_at_minus_1"]) / 2 for r in runs)})


def convergence_paired(runs):
    """YaPO's margin gain minus BiPO's, pair by pair (each averaged over the seeds both methods ran), per setting
    trained on all training pairs: the two methods are scored on the same held-out pairs, so the paired interval
    is the one to read."""
    out = []
    for setting in ("paper", "best_lr"):
        by = {m: {r["seed"]: r for r in runs if (r["setting"], r["method"]) == (setting, m)} for m in TRAINED}
        seeds = sorted(set(by["YaPO"]) & set(by["BiPO"]))
        if not seeds:
            continue
        diff = (seed_mean_gains([by["YaPO"][s] for s in seeds])
                - seed_mean_gains([by["BiPO"][s] for s in seeds]))
        mean, ci = yapo.mean_interval(diff)
        out.append({"setting": setting, "comparison": "YaPO - BiPO", "seeds": ", ".join(map(str, seeds)),
                    "difference": mean, "ci95": ci, "n": len(diff), "verdict": verdict(mean, ci, len(diff))})
    return out


def convergence_summary(env, runs, chosen, seeds, n_fit, n_val, sae_sha256):
    conf = env.convergence
    thresholds = conf["loss_thresholds"]
    table = []
    for setting in ("paper", "validation", "best_lr"):
        for method in TRAINED:
            mine = [r for r in runs if (r["setting"], r["method"]) == (setting, method)]
            groups = [[r] for r in mine] if setting == "validation" else [mine] if mine else []   # one row per lr
            table += [convergence_row(setting, method, group, thresholds) for group in groups]
    steps = lambda c: "not reached" if c["mean"] is None else f"{c['mean']:.0f} ({c['reached']})"
    below = [f"steps_to_loss_below_{t}" for t in thresholds]
    cells = [{"setting": r["setting"], "method": r["method"], "lr": r["lr"], "lam": r["lam"], "seeds": r["seeds"],
              "steps": r["steps"], **{k: steps(r[k]) for k in below}, "min_loss": r["min_loss"]["mean"],
              "last_epoch_loss": r["last_epoch_loss"]["mean"], "margin_gain": pm(r["margin_gain"], ".2f"),
              "drift": f"{r['drift_at_pm1']:.2g}", "n": r["n"]}
             for r in table]
    columns = [("setting", "setting"), ("method", "method"), ("lr", "lr"), ("lam", "lam"), ("seeds", "seeds"),
               ("steps", "steps")] + [(k, "steps to loss < " + k.rsplit("_", 1)[1]) for k in below] + [
        ("min_loss", "lowest loss"), ("last_epoch_loss", "last epoch's mean loss"),
        ("margin_gain", "margin gain m=-1 to +1 (nats)"), ("drift", "drift KL at m=+-1"), ("n", "n pairs")]
    paired = convergence_paired(runs)
    paired_cells = [p | {"difference": pm({"mean": p["difference"], "ci95": p["ci95"]})} for p in paired]
    note = ((common.TINY_NOTE + " " if env.tiny else "") + f"{conf['behavior']}, {conf['epochs']} epochs; paper: "
            f"lambda {conf['paper']['lam']}, lr {conf['paper']['lr']:g} (the paper's Table 6), its 100 warm-up "
            f"steps capped at a tenth of the run; best_lr: lambda auto at the lr validation chose for each method "
            f"({chosen or 'not yet'}), from {conf['lrs']} trained on {n_fit} training pairs and scored on {n_val} "
            f"validation pairs (largest margin gain with mean drift at m = +-1 under {conf['max_drift']}). Steps "
            f"count optimizer updates before the first step whose loss (4 pairs, one random d) is below the "
            f"threshold: the mean over the seeds that got there, and how many did. Lowest loss and the last epoch's "
            f"mean loss: means over the seeds. Margin gain: each held-out pair's margin at m = +1 minus at m = -1 "
            f"(lambda as in the row), averaged over the seeds, then its 95 % interval over pairs (validation rows: on "
            f"the validation pairs). Drift: the mean over the seeds of the drift KL at m = +1 and -1, averaged. The "
            f"paper: YaPO's loss below 0.1 within 150 steps, BiPO's still above 0.3 after 600.")
    # the summary sits in the folder of the units and names their SAE, as a unit does (Loaded.get reads it too)
    results = {"benchmark": "sweep_convergence", "tiny": env.tiny, "sae_sha256": sae_sha256, "settings": conf,
               "seeds": seeds, "chosen_lr": chosen, "summary": table, "paired": paired, "note": note}
    out = env.folder / "convergence.json"
    common.write_json(out, results)
    out.with_suffix(".md").write_text("\n".join([
        "# Convergence, YaPO against BiPO" + (" (the toy: a smoke test)" if env.tiny else ""), "", note, "",
        common.markdown_table(cells, columns), "",
        "YaPO's margin gain minus BiPO's, per held-out pair (the same pairs), with its 95 % interval:", "",
        common.markdown_table(paired_cells, [("setting", "setting"), ("seeds", "seeds"), ("comparison", "comparison"),
                                             ("difference", "margin gain difference (nats)"), ("n", "n pairs"),
                                             ("verdict", "verdict")]), ""]))
    return results


# ---------------------------------------------------------------------------------------------- command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["run", "report", "convergence"], help="see the docstring")
    p.add_argument("--tiny", action="store_true", help="the toy (yapo.py --tiny), in benchmarks/results/quick/sweep/")
    p.add_argument("--minutes", type=float, default=60.0, help="run, convergence: start no unit that would end later")
    p.add_argument("--behaviors", nargs="+", default=None, help="run, report: these behaviours (default: all)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="run: these methods")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--kl", type=float, nargs="+", default=KLS, help="report: the equal drifts")
    p.add_argument("--results", default=None, help="the folder of the units (default: benchmarks/results/local/"
                                                   "sweep, --tiny: benchmarks/results/quick/sweep)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 2, --tiny 1); 1 leaves a core "
                                                             "free for other work (units then took 15-20 minutes)")
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads or (1 if opts.tiny else 2))  # the toy's small matrices lose on threads
    env = where(opts.tiny, opts.results)
    behaviors = opts.behaviors or list(env.behaviors)
    unknown = set(behaviors) - set(env.behaviors)
    if unknown:
        p.error(f"unknown behaviour(s) {sorted(unknown)}: choose from {list(env.behaviors)}")
    if opts.what == "run":
        return run(env, behaviors, opts.methods, opts.seeds, opts.minutes)
    if opts.what == "report":
        return report(env, behaviors, opts.seeds, opts.kl)
    return convergence(env, opts.seeds, opts.minutes)


if __name__ == "__main__":
    main()
