"""Five steering vectors for one behaviour, side by side, built on the same training pairs and scored by
yapo.evaluate on the same held-out pairs at the same multipliers m (steering with m*lam*v):

  none   v = 0: the unsteered model at every m (the floor every method is compared with)
  CAA    offline.caa_vector: mean residual-stream difference between chosen and rejected answers
  SAS    offline.sas_vector: the same in SAE latents, on the latents frequent on one side only
  BiPO   yapo.train with --method bipo: a residual-stream vector learned from the preference pairs
  YaPO   yapo.train with --method yapo: a vector of SAE latents learned from the preference pairs

Per method: behaviour score (mean sigmoid(log p(y_w|x) - log p(y_l|x))), margin (the mean of that log-prob
difference in nats, which still moves where the sigmoid saturates) and accuracy at m = -1 and +1, the
drift KL of the next-token distribution at +1, for MCQ culture rows the MCQ accuracy, RCA and PNLG at +1,
and the seconds it took to build its vector. Vectors of different methods have different natural scales,
so each is also read at the same cost: evaluated again at the m > 0 whose measured drift KL is within 5 % of
--kl (calibrated_rows: yapo.multiplier_for_drift, a search on the drift alone), with the behaviour score and
margin there ("not reached" if no m up to M_MAX gets there); the paired differences at equal drift are read from
those rows. (Before calibration, the m was interpolated on the grid: at_kl, kept in the JSON for comparison.)

    python benchmarks/compare_methods.py                      # tiny setup (yapo.py --tiny): mechanics only
    python benchmarks/compare_methods.py --quick              # smoke test: 1 epoch on 8 pairs, 4 scored
    python benchmarks/compare_methods.py --preset paper-2b    # the real run (GPU, hub access)
    python benchmarks/compare_methods.py --model M --sae S --sae-id ID --layer L [any yapo.py flag]
    python benchmarks/compare_methods.py --pool A.json B.json C.json   # one behaviour's seeds, read together

Flags this script does not know are passed to yapo.py's parser (e.g. --lam, --epochs, --sas-tau, --format,
--country); --preset and --tiny change defaults there exactly as they do for yapo.py. The multipliers are
this script's (-1 and the sweep 0, 0.5, 1, 2, 4, 8). --lam applies to BiPO and YaPO (auto: each its own);
CAA and SAS always use lam 1, as yapo.py --method caa|sas does, since their vectors are mean differences already
in the units of h (or of the latents). On the tiny setup SAS tries --sas-tau 0.1, 0.05, 0.02 in turn unless
--sas-tau is given. Writes the JSON (--out) and the tables as markdown next to it (<stem>.md).

--pool reads the JSONs of several seeds of one behaviour (the same held-out pairs; it checks) and writes YaPO minus
each other method at equal drift with an interval over question groups and seeds (common.paired_interval) and
Holm's verdicts across those comparisons, to <first stem>_pooled.json and .md; it builds and evaluates nothing.
"""

import dataclasses
import json
import time
from pathlib import Path

import common  # first: puts the repository root on sys.path and silences progress bars

import offline  # noqa: E402
import torch  # noqa: E402
import yapo  # noqa: E402

FULL = {"multipliers": [-1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0], "max_train_pairs": None, "max_test_pairs": None,
        "epochs": None}                                            # None: yapo.py's (or the preset's) epochs
QUICK = {"multipliers": [-1.0, 0.0, 1.0, 4.0], "max_train_pairs": 8, "max_test_pairs": 4, "epochs": 1}
METHODS = ("none", "CAA", "SAS", "BiPO", "YaPO")
METHOD = {"none": "bipo", "CAA": "caa", "SAS": "sas", "BiPO": "bipo", "YaPO": "yapo"}   # yapo.py --method
M_MAX = 16.0                        # calibration: a drift that no m up to this reaches is "not reached"
TINY_SAS_TAUS = (0.1, 0.05, 0.02)   # the tiny SAE's latents are rarer than Gemma Scope's: yapo's 0.7 keeps none


def yapo_args(opts, rest, method="yapo"):
    """yapo.Args for one mode from yapo.py's own parser: --tiny unless a real model is named, so that --preset,
    --tiny, each mode's own defaults (lam 1 for caa and sas, the toy's lr for dense) and explicit flags combine
    exactly as they do for yapo.py. A --lam given for the trained methods is not handed to caa and sas."""
    argv = ["--seed", str(opts.seed), "--data", opts.data]
    for flag, value in (("--behavior", opts.behavior), ("--preset", opts.preset), ("--model", opts.model),
                        ("--sae", opts.sae), ("--sae-id", opts.sae_id), ("--layer", opts.layer)):
        if value not in (None, ""):
            argv += [flag, str(value)]
    tiny = not (opts.preset or opts.model)
    return yapo.parse_args(common.with_method(argv + (["--tiny"] if tiny else []) + rest, method)), tiny


def build(method, model, tok, sae, train_pairs, args, tiny, sas_tau_given):
    """v for one method, the SAE its hook needs (None: dense) and what to record about it."""
    if method == "none":
        return torch.zeros(model.config.hidden_size, device=model.device), None, {}
    if method == "CAA":
        return offline.caa_vector(model, tok, train_pairs, args), None, {}
    if method == "SAS":
        taus = (args.sas_tau,) if sas_tau_given or not tiny else TINY_SAS_TAUS
        for tau in taus:                                           # the first tau that keeps a latent
            try:
                return offline.sas_vector(model, tok, sae, train_pairs, dataclasses.replace(args, sas_tau=tau)), sae, \
                    {"sas_tau": tau}
            except ValueError:
                if tau == taus[-1]:
                    raise
    v, history = yapo.train(model, tok, sae if method == "YaPO" else None, train_pairs, args)
    return v, (sae if method == "YaPO" else None), {"steps": len(history), "final_loss": history[-1]["loss"]}


def at_kl(sweep, kl):
    """Where drift KL first exceeds `kl` in the positive sweep (which starts at m = 0, drift 0): m linearly
    interpolated between the first sweep point above `kl` and the one before it, and the behaviour score
    interpolated the same way (and the margin). None if no point of the sweep exceeds `kl`."""
    points = sorted((r for r in sweep if r["multiplier"] >= 0), key=lambda r: r["multiplier"])
    assert points[0]["multiplier"] == 0, "the sweep must include m = 0"
    for lo, hi in zip(points, points[1:]):
        if hi["drift_kl"] > kl:                                    # the first to exceed, so lo["drift_kl"] <= kl
            t = (kl - lo["drift_kl"]) / (hi["drift_kl"] - lo["drift_kl"])
            at = lambda key: lo[key] + t * (hi[key] - lo[key]) if key in lo else None
            return {"multiplier": at("multiplier"), "behavior_score": at("behavior_score"), "margin": at("margin"),
                    "between": [lo["multiplier"], hi["multiplier"]]}
    return None


def calibrated_rows(model, tok, sae, v, test, args, kls, m_max=M_MAX, sides=(("plus", 1.0), ("minus", -1.0))):
    """For each target drift and each sign, the held-out pairs evaluated at the multiplier whose measured drift KL
    is within 5 % of the target (yapo.multiplier_for_drift, on the drift alone): {"0.05": {"plus": row | None,
    "minus": ...}, ...}, each row with its "multiplier" and the "drift_kl" measured there; None: not reached for
    |m| up to m_max."""
    out, seen = {}, {}
    for kl in kls:
        out[str(kl)] = {}
        for side, sign in sides:
            found = yapo.multiplier_for_drift(model, tok, sae, v, test, args, kl, sign, m_max=m_max, seen=seen)
            out[str(kl)][side] = found and yapo.evaluate(
                model, tok, sae, v, test, dataclasses.replace(args, multipliers=[found["multiplier"]]))["rows"][0]
    return out


def per_pair(row, metric):
    """One metric on each held-out pair, from an evaluate row (mcq_accuracy: on each MCQ row)."""
    if metric == "mcq_accuracy":
        return torch.tensor(row["mcq"]["correct"], dtype=torch.float64)
    margin = torch.tensor(row["per_pair"]["margin"], dtype=torch.float64)
    return {"behavior_score": torch.sigmoid(margin), "accuracy": (margin > 0).double(), "margin": margin}[metric]


def per_pair_at(entry, metric, where):
    """Per-pair values at multiplier `where`, or (where = ("kl", x)) at equal drift: from the row evaluated at the
    calibrated multiplier where the entry has one ("calibrated"), else interpolated between the same two sweep
    points as at_kl does for the means (units measured before calibration); None if never reached."""
    by_m = {r["multiplier"]: r for r in entry["rows"]}
    if not isinstance(where, tuple):
        return per_pair(by_m[where], metric)
    if "calibrated" in entry:
        row = entry["calibrated"][str(where[1])]["plus"]
        return None if row is None else per_pair(row, metric)
    hit = at_kl(entry["rows"], where[1])
    if hit is None:
        return None
    lo, hi = hit["between"]
    t = (hit["multiplier"] - lo) / (hi - lo)
    return per_pair(by_m[lo], metric) + t * (per_pair(by_m[hi], metric) - per_pair(by_m[lo], metric))


def paired_differences(methods, kls, clusters, base="YaPO"):
    """base minus every other method on the same held-out pairs, pair by pair, at m = -1, m = +1 and at equal drift
    (each KL in kls), with a 95 % interval over the groups of pairs (common.paired_interval; clusters: one id per
    pair, both forms of a culture question share one); at equal drift also a verdict after Holm's correction across
    those comparisons: 'better' or 'worse' where it rejects "no difference", else 'cannot tell at n = ...'."""
    metrics = ["behavior_score", "accuracy", "margin"] + (["mcq_accuracy"] if "mcq" in methods[base]["rows"][0] else [])
    out = []
    for other in (m for m in methods if m != base):
        for where in [-1.0, 1.0] + [("kl", kl) for kl in kls]:
            for metric in metrics:
                a, b = per_pair_at(methods[base], metric, where), per_pair_at(methods[other], metric, where)
                row = {"comparison": f"{base} - {other}", "at": f"m = {where:+g}" if isinstance(where, float)
                       else f"KL {where[1]:g}", "metric": metric}
                if a is None or b is None:
                    out.append(row | {"difference": "not reached", "ci95": None, "n": None, "verdict": None})
                    continue
                cl = clusters if metric != "mcq_accuracy" else [c for c, p in clusters.mcq]
                r = common.paired_interval(a[None], b[None], cl)
                out.append(row | {k: r[k] for k in ("difference", "ci95", "p")} | {"n": len(a), "verdict": None})
    common.holm_verdicts([r for r in out if r["at"].startswith("KL") and r["n"]])
    return out


class Clusters(list):
    """The held-out pairs' cluster ids (a question's group, else the pair itself), and those of its MCQ pairs."""

    def __init__(self, test_pairs):
        super().__init__((p["group"] or p["where"]) for p in test_pairs)
        self.mcq = [(p["group"] or p["where"], p) for p in test_pairs if p["format"] == "mcq"]


def summary_row(method, entry):
    """One line of the table, from the method's evaluate rows."""
    by_m = {r["multiplier"]: r for r in entry["rows"]}
    lo, hi = by_m[-1.0], by_m[1.0]
    mcq = hi.get("mcq") or {}
    hit = entry["at_kl"]                                   # the row at the calibrated multiplier, or None
    return {"method": method, "build_s": entry["build_seconds"], "lam": entry["lam"],
            "score_minus_1": lo["behavior_score"], "score_plus_1": hi["behavior_score"],
            "margin_minus_1": lo.get("margin"), "margin_plus_1": hi.get("margin"),
            "accuracy_minus_1": lo["accuracy"], "accuracy_plus_1": hi["accuracy"], "drift_kl_plus_1": hi["drift_kl"],
            "mcq_accuracy_plus_1": mcq.get("accuracy"), "rca_plus_1": mcq.get("rca"), "pnlg_plus_1": mcq.get("pnlg"),
            "m_at_kl": hit["multiplier"] if hit else "not reached",
            "score_at_kl": hit["behavior_score"] if hit else "not reached",
            "margin_at_kl": hit["margin"] if hit else "not reached"}


def sweep_rows(methods):
    """Per method, 'score / margin / drift KL' at each multiplier: the sweep the table is read from."""
    cell = lambda r: f"{r['behavior_score']:.3f} / {common.fmt(r.get('margin'))} / {r['drift_kl']:.3g}"
    return [{"method": name} | {r["multiplier"]: cell(r) for r in e["rows"]} for name, e in methods.items()]


def passed_through(own):
    """--help's list of the yapo.py flags this script hands on to yapo.py's parser (all but its own)."""
    return "yapo.py flags, passed through to yapo.py's parser:\n" + "\n".join(
        f"  --{f.name.replace('_', '-'):<20} {f.metadata['help']}" for f in dataclasses.fields(yapo.Args)
        if f.name not in own)


def pool(paths, kls):
    """YaPO minus every other method at each equal drift, over the seeds of several runs of this script on one
    behaviour: per pair, each method's value averaged over its runs that reach the drift; common.paired_interval
    over question groups and seeds; Holm's correction across the comparisons reached."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    if len({json.dumps(r["methods"]["none"]["rows"][0]["per_pair"]["margin"]) for r in runs}) != 1:
        raise SystemExit(f"--pool: {', '.join(map(str, paths))} do not score the same held-out pairs")
    args = yapo.Args(**runs[0]["args"] | ({"data": str(common.DATA)} if runs[0]["args"]["data"] == common.DATA.name
                                          else {}))
    clusters = Clusters(yapo.load_pairs(args)[1][:runs[0]["shapes"]["max_test_pairs"]])
    metrics = ["behavior_score", "accuracy", "margin"]
    out = []
    for other in (m for m in METHODS if m != "YaPO"):
        for kl in kls:
            for metric in metrics:
                got = {m: [per_pair_at(r["methods"][m], metric, ("kl", kl)) for r in runs] for m in ("YaPO", other)}
                got = {m: [x for x in xs if x is not None] for m, xs in got.items()}
                row = {"comparison": f"YaPO - {other}", "at": f"KL {kl:g}", "metric": metric,
                       "runs_reaching": f"{len(got['YaPO'])}/{len(runs)} vs {len(got[other])}/{len(runs)}"}
                if not got["YaPO"] or not got[other]:
                    out.append(row | {"difference": "not reached", "ci95": None, "p": None, "n": None})
                    continue
                r = common.paired_interval(torch.stack(got["YaPO"]), torch.stack(got[other]), clusters)
                out.append(row | {k: r[k] for k in ("difference", "ci95", "p")} | {"n": len(clusters)})
    tested = common.holm_verdicts([r for r in out if r["n"]])
    return {"benchmark": "compare_methods_pooled", "runs": [str(p) for p in paths], "behavior": runs[0]["behavior"],
            "seeds": [r["seed"] for r in runs], "comparisons": len(tested), "correction": "Holm", "paired": out}


def main(argv=None):
    own = {"behavior", "seed", "data", "preset", "model", "sae", "sae_id", "layer",           # flags of this script
           "method", "multipliers", "n_generations", "max_new_tokens", "top_k", "eval_only", "vector",   # set by it
           "export_gguf", "export_multiplier", "out_dir"}
    p = common.parser(__file__, __doc__.strip().split("\n")[0], epilog=passed_through(own))
    p.add_argument("--behavior", default=None, help="which rows of --data (default: yapo.py's; --tiny: the toy)")
    p.add_argument("--seed", type=int, default=0, help="one seed: the split, the tiny model, training")
    p.add_argument("--data", default=str(common.DATA), help="preference pairs, as yapo.py --data")
    p.add_argument("--kl", type=float, nargs="+", default=[0.05, 0.2],
                   help="drift KLs at which methods are compared at equal cost (the table: the first)")
    p.add_argument("--preset", default="", choices=["", *yapo.PRESETS], help="a yapo.py preset: the real run")
    p.add_argument("--model", default=None, help="hub id or folder of the real model (no --tiny then)")
    p.add_argument("--sae", default=None, help="sae-lens release or folder")
    p.add_argument("--sae-id", default=None, help="SAE id inside the release")
    p.add_argument("--layer", type=int, default=None, help="the layer the SAE reads and the hook steers")
    p.add_argument("--pool", nargs="+", default=None, help="JSONs of this script, several seeds: read together")
    opts, rest = p.parse_known_args(argv)
    if opts.pool:
        results = pool(opts.pool, opts.kl)
        out = Path(opts.pool[0]).with_name(Path(opts.pool[0]).stem + "_pooled.json")
        columns = [("comparison", "comparison"), ("at", "at"), ("metric", "metric"), ("difference", "difference"),
                   ("ci95", "+- (95 %)"), ("n", "n"), ("runs_reaching", "runs reaching it"), ("verdict", "verdict")]
        note = (f"YaPO minus each method at equal drift over seeds {results['seeds']} of {results['behavior']} (the "
                f"same held-out pairs): per pair, each method's value averaged over its runs; a 95 % interval over "
                f"question groups and seeds (common.paired_interval), verdicts after Holm's correction across the "
                f"{results['comparisons']} comparisons reached.")
        common.print_table(results["paired"], columns)
        common.write_json(out, results | {"note": note})
        out.with_suffix(".md").write_text("\n".join([f"# Steering methods compared, seeds pooled: "
                                                     f"{results['behavior']}", "", note, "",
                                                     common.markdown_table(results["paired"], columns), ""]))
        print(f"wrote {out.with_suffix('.md')}")
        return results
    if min(opts.kl) <= 0:
        p.error("--kl must be positive: the drift KL at m = 0 is 0")
    shapes = QUICK if opts.quick else FULL

    def method_args(method):
        args, tiny = yapo_args(opts, rest, method)
        args = dataclasses.replace(args, multipliers=shapes["multipliers"], epochs=shapes["epochs"] or args.epochs,
                                   n_generations=0,     # the table reads no answers; evaluate still answers open
                                   max_new_tokens=1)    # culture prompts, so keep those one token long
        return args, tiny

    args, tiny = method_args("yapo")                               # YaPO: setup loads the SAE too
    mechanics_only = tiny and args.behavior != "toy_sentiment"     # the toy is the one a tiny model can learn
    if tiny:
        torch.set_num_threads(1)                                   # as yapo.py --tiny: tiny matrices lose on threads
    sas_tau_given = any(a.split("=")[0] == "--sas-tau" for a in rest)

    train_pairs, test_pairs = yapo.load_pairs(args)
    if not test_pairs:
        raise SystemExit("no held-out pairs: raise --test-fraction or mark rows split='test'")
    model, tok, sae = yapo.setup(args)
    if any(p["rejected"] is None for p in train_pairs + test_pairs) or args.resample_rejected == "all":
        offline.sample_rejected(model, tok, train_pairs + test_pairs, args)   # as yapo.py: on-policy y_l
    train_pairs, test_pairs = train_pairs[:shapes["max_train_pairs"]], test_pairs[:shapes["max_test_pairs"]]
    print(f"{args.behavior}: {len(train_pairs)} train / {len(test_pairs)} held-out pairs, layer {args.layer}, "
          f"multipliers {args.multipliers}" + ("  [tiny setup: mechanics only]" if mechanics_only else ""), flush=True)

    fit = offline.sae_fit(model, tok, sae, train_pairs, args.layer)     # printed; warns if the SAE reads L poorly
    if args.lam == "auto" and fit["fvu"] > offline.POOR_FVU:
        raise SystemExit(f"--lam auto needs an SAE that reads layer {args.layer} (FVU {fit['fvu']:.2f}): check "
                         f"--layer, --model and --sae, or pass --lam")
    methods = {}
    for method in METHODS:
        margs = method_args(METHOD[method])[0]
        if method == "none":
            margs = dataclasses.replace(margs, lam=1.0)            # v = 0: lam changes nothing
        if margs.lam == "auto":                                    # per method: latents and h differ in scale
            margs = dataclasses.replace(margs, lam=yapo.auto_lam(model, tok, sae if yapo.uses_sae(margs.method)
                                                                 else None, train_pairs, margs))
        t0 = time.perf_counter()
        v, hook_sae, extra = build(method, model, tok, sae, train_pairs, margs, tiny, sas_tau_given)
        seconds = time.perf_counter() - t0
        rows = yapo.evaluate(model, tok, hook_sae, v, test_pairs, margs)["rows"]
        calibrated = (calibrated_rows(model, tok, hook_sae, v, test_pairs, margs, opts.kl, sides=(("plus", 1.0),))
                      if method != "none" else {str(kl): {"plus": None} for kl in opts.kl})   # v = 0 never drifts
        methods[method] = {"mode": METHOD[method], "space": "SAE latents" if hook_sae is not None else "residual stream",
                           "lam": float(margs.lam), "build_seconds": seconds, "l0": int((v != 0).sum()),
                           "norm": v.norm().item(), **extra, "rows": rows, "calibrated": calibrated,
                           "at_kl": calibrated[str(opts.kl[0])]["plus"],
                           "at_kl_interpolated": at_kl(rows, opts.kl[0])}
        print(f"{method:>5}: built in {seconds:.1f} s, evaluated", flush=True)

    table = [summary_row(m, e) for m, e in methods.items()]
    mcq = any(r["mcq_accuracy_plus_1"] is not None for r in table)     # culture data: rows with options
    columns = [("method", "method"), ("build_s", "build s"), ("lam", "lam"), ("score_minus_1", "score m=-1"),
               ("score_plus_1", "score m=+1"), ("margin_minus_1", "margin m=-1"), ("margin_plus_1", "margin m=+1"),
               ("accuracy_minus_1", "acc m=-1"), ("accuracy_plus_1", "acc m=+1"),
               ("drift_kl_plus_1", "drift KL m=+1")]
    if mcq:
        columns += [("mcq_accuracy_plus_1", "MCQ acc m=+1"), ("rca_plus_1", "RCA m=+1"), ("pnlg_plus_1", "PNLG m=+1")]
    kl = opts.kl[0]
    columns += [("m_at_kl", f"m at KL {kl:g}"), ("score_at_kl", f"score at KL {kl:g}"),
                ("margin_at_kl", f"margin at KL {kl:g}")]

    paired = paired_differences(methods, opts.kl, Clusters(test_pairs))
    paired_columns = [("comparison", "comparison"), ("at", "at"), ("metric", "metric"), ("difference", "difference"),
                      ("ci95", "+- (95 %)"), ("n", "n"), ("verdict", "at equal drift")]

    setup = (f"the committed toy (benchmarks/toy/), v seed {args.seed}, --preset tiny" if tiny else
             f"{args.model}, SAE {args.sae}" + (f" / {args.sae_id}" if args.sae_id else "") + f", layer {args.layer}")
    note = ((common.TINY_NOTE + " MECHANICS ONLY: this table shows that every method runs end to end and how its "
             "numbers are read, not which method steers better.") if mechanics_only else
            (common.TINY_NOTE + f" toy_sentiment is a behaviour such a model can learn: the table shows what each "
             f"method does to it on {len(test_pairs)} held-out pairs (unseen items), one seed.") if tiny else
            f"{len(test_pairs)} held-out pairs, one seed: read differences between methods with that sample in mind.")
    note += (f" Each method is evaluated at m*lam*v with the lam in its row; vectors of different methods have "
             f"different natural scales, so 'm at KL {kl:g}' also compares them at equal drift instead of at "
             f"equal m: each evaluated again at the m > 0 whose measured drift KL is within 5 % of {kl:g} "
             f"(not reached: no m up to {M_MAX:g}). Drift KL is KL(steered || unsteered) of the "
             f"next-token distribution after each held-out prompt; scores at m = 0 are the unsteered model's "
             f"for every method.")
    title = (f"# Steering methods compared: {args.behavior}, seed {args.seed}"
             + (" (tiny setup: MECHANICS ONLY)" if mechanics_only else " (the offline toy)" if tiny else ""))
    markdown = "\n".join([title, "", f"Setup: {setup}; {len(train_pairs)} training pairs, {len(test_pairs)} held-out "
                          f"pairs; multipliers {args.multipliers}" + (" [QUICK: a smoke test]" if opts.quick else ""),
                          "", common.markdown_table(table, columns), "", note, "",
                          "Paired differences on the same held-out pairs, with 95 % intervals over the groups of "
                          "pairs (Student's t); the verdicts at equal drift follow Holm's correction across them:", "",
                          common.markdown_table(paired, paired_columns), "",
                          "Behaviour score / margin (nats) / drift KL at each multiplier:", "",
                          common.markdown_table(sweep_rows(methods), [("method", "method")] + [
                              (m, f"m={m:g}") for m in args.multipliers]), ""])
    results = {"benchmark": "compare_methods", "quick": opts.quick, "tiny": tiny, "mechanics_only": mechanics_only,
               "setup": setup, "behavior": args.behavior, "seed": args.seed, "kl_threshold": kl,
               "kl_thresholds": opts.kl,
               "sae_fit": fit, "shapes": shapes | {"train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
                                   "d_model": model.config.hidden_size, "d_sae": sae.cfg.d_sae},
               "args": dataclasses.asdict(args) | ({"data": common.DATA.name} if Path(args.data) == common.DATA
                                                    else {}),
               "machine": common.machine(), "methods": methods, "table": table,
               "paired": paired, "markdown": Path(opts.out).with_suffix(".md").name, "note": note}

    print()
    common.print_table(table, columns)
    print("\n" + note + "\n\nPaired differences on the same held-out pairs:")
    common.print_table(paired, paired_columns)
    common.write_json(opts.out, results)
    Path(opts.out).with_suffix(".md").write_text(markdown)
    print(f"wrote {Path(opts.out).with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
