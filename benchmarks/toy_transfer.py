"""Does the toy's steering carry beyond its own template? YaPO and BiPO vectors built exactly as
`python yapo.py --tiny [--method bipo]` builds them (the same toy, settings and seed), evaluated on two held-out
sets: the toy's test split (items never seen, the training frames and words) and toy_sentiment_novel (items,
question frames, answer sentences and sentiment words that no toy_sentiment row uses; its words and clauses come
from the toy's pretraining reviews, offline.toy_reviews, so the model knows them and the steering pairs never
showed them).

    python benchmarks/toy_transfer.py                      # the committed toy of --tiny: about a minute
    python benchmarks/toy_transfer.py --seeds 0 1 2 --reviews 0 1000 2000 4000 \
        --out benchmarks/results/toy_transfer_grid.json   # is it robust? 12 toys rebuilt, 16 minutes on a shared core

--reviews rebuilds the toy (offline.build_toy) with that many pretraining reviews (the committed toy read 2000; 0: the
pairs alone) and --seeds seeds its recipe, to see how much the result hangs on either; without --reviews the
committed toy is used and --seeds seeds v's training only.
"""

import dataclasses

import common  # first: puts the repository root on sys.path and silences progress bars

import offline  # noqa: E402
import yapo  # noqa: E402

SETS = ("toy_sentiment", "toy_sentiment_novel")


def one_toy(seed, n_reviews, quick=False):
    flags = ["--tiny", "--seed", str(seed), "--multipliers", "-1", "0", "1", "--n-generations", "0"]
    flags += ["--epochs", "1"] if quick else []
    args = yapo.parse_args(flags)
    train, test = yapo.load_pairs(args)
    novel = yapo.load_pairs(dataclasses.replace(args, behavior="toy_sentiment_novel"), need_train=False)[1]
    lm_tokens = 16_000 if quick else 256_000                                   # --quick: a smoke test
    model, tok, sae = yapo.setup(args) if n_reviews is None else \
        offline.build_toy(train, seed, lm_tokens=lm_tokens, n_reviews=n_reviews)         # rebuilt by its recipe
    out = {"seed": seed, "reviews": n_reviews, "test_pairs": {SETS[0]: len(test), SETS[1]: len(novel)}, "methods": {}}
    for name, method in (("YaPO", "yapo"), ("BiPO", "bipo")):
        margs = yapo.parse_args(flags + ["--method", method])
        hook_sae = sae if method == "yapo" else None
        margs = dataclasses.replace(margs, lam=yapo.auto_lam(model, tok, hook_sae, train, margs))
        v, _ = yapo.train(model, tok, hook_sae, train, margs)
        out["methods"][name] = {}
        for label, pairs in zip(SETS, (test, novel)):
            rows = yapo.evaluate(model, tok, hook_sae, v, pairs, margs)["rows"]
            for r in rows:
                r.pop("per_pair")
            out["methods"][name][label] = rows
            print(f"\nseed {seed}, {n_reviews} reviews: {name} on {label}:")
            yapo.print_table(rows)
    return out


def summary(toys):
    """Per toy and method: the behaviour score at m = -1 / 0 / +1 on each set."""
    lines = ["| seed | reviews | method | toy_sentiment (test split) | toy_sentiment_novel |", "| --- | --- | --- | --- | --- |"]
    for t in toys:
        for name, sets in t["methods"].items():
            cells = [" / ".join(f"{r['behavior_score']:.2f}" for r in sets[s]) for s in SETS]
            lines.append(f"| {t['seed']} | {t['reviews'] if t['reviews'] is not None else 'committed'} | {name} | "
                         f"{cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None):
    p = common.parser(__file__, __doc__.strip().split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="the toy's seeds, as yapo.py --seed")
    p.add_argument("--reviews", type=int, nargs="+", default=[None], help="rebuild the toy with this many "
                   "pretraining reviews (the committed one read 2000); default: the committed toy")
    opts = p.parse_args(argv)
    toys = [one_toy(seed, n, opts.quick) for n in opts.reviews for seed in opts.seeds]
    print("\nbehaviour score at m = -1 / 0 / +1\n" + summary(toys))
    common.write_json(opts.out, {"benchmark": "toy_transfer", "quick": opts.quick, "toys": toys,
                                 "machine": common.machine(), "note": common.TINY_NOTE})


if __name__ == "__main__":
    main()
