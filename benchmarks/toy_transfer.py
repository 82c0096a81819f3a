"""Does the toy's steering carry beyond its own template? YaPO and BiPO vectors built exactly as
`python yapo.py --tiny [--mode dense]` builds them (the same toy, settings and seed), evaluated on two held-out
sets: the toy's test split (items never seen, the training frames and words) and toy_sentiment_novel (items,
question frames, answer frames and sentiment words that no toy_sentiment row uses; the toy model never saw them,
so its tokenizer cuts the new words into pieces learned from other words).

    python benchmarks/toy_transfer.py              # about a minute and a half on one core
"""

import dataclasses

import common  # first: puts the repository root on sys.path and silences progress bars

import yapo  # noqa: E402

SETS = ("toy_sentiment", "toy_sentiment_novel")


def main(argv=None):
    p = common.parser(__file__, __doc__.strip().split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="the toy's seed, as yapo.py --seed")
    opts = p.parse_args(argv)
    flags = ["--tiny", "--seed", str(opts.seed), "--multipliers", "-1", "0", "1", "--n-generations", "0"]
    args = yapo.parse_args(flags)
    train, test = yapo.load_pairs(args)
    novel = yapo.load_pairs(dataclasses.replace(args, behavior="toy_sentiment_novel"), need_train=False)[1]
    model, tok, sae = yapo.setup(args, train)                     # the toy of yapo.py --tiny
    results = {"benchmark": "toy_transfer", "seed": opts.seed, "quick": opts.quick,
               "test_pairs": {"toy_sentiment": len(test), "toy_sentiment_novel": len(novel)}, "methods": {}}
    for name, mode in (("YaPO", "sparse"), ("BiPO", "dense")):
        margs = yapo.parse_args(flags + ["--mode", mode])
        margs.layer = args.layer
        hook_sae = sae if mode == "sparse" else None
        margs.lam = yapo.auto_lam(model, tok, hook_sae, train, margs)
        v, _ = yapo.train(model, tok, hook_sae, train, margs)
        results["methods"][name] = {}
        for label, pairs in zip(SETS, (test, novel)):
            rows = yapo.evaluate(model, tok, hook_sae, v, pairs, margs)["rows"]
            for r in rows:
                r.pop("per_pair")
            results["methods"][name][label] = rows
            print(f"\n{name} on {label}:")
            yapo.print_table(rows)
    results["machine"] = common.machine()
    common.write_json(opts.out, results)


if __name__ == "__main__":
    main()
