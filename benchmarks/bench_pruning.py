"""How many latents carry the behaviour, and what they read: train a YaPO vector, prune it to its top-K latents by
|v_i| with offline.prune, score the held-out pairs with yapo.evaluate at multipliers -1, 0, +1, and list the top
latents of the full vector with the places in the training texts where each fires most (offline.latent_contexts).

By default on the committed toy of `yapo.py --tiny` (benchmarks/toy/, trained on the toy_sentiment training pairs,
yapo.PRESETS["tiny"] for lambda, learning rate, epochs and warm-up; held-out pairs ask about items never seen).
With --model/--sae/--layer on a real model and its SAE, with lambda auto and --lr/--epochs.

behaviour score = mean sigmoid(log p(y_w|x) - log p(y_l|x)) on held-out pairs; "effect" = score(+1) -
score(-1), and "share of effect" compares it with the unpruned vector's. The behaviour score saturates when
log-prob differences are large, so the margin (mean log p(y_w|x) - log p(y_l|x), nats) is listed as well.

    python benchmarks/bench_pruning.py            # the toy (under a minute on 2 cores)
    python benchmarks/bench_pruning.py --model benchmarks/local/gemma-3-270m --sae \
        benchmarks/sae-gemma-3-270m-L10 --layer 10 --behavior power_seeking --lr LR --epochs 4 \
        --warmup-steps 4 --out benchmarks/results/local_pruning.json  # the real model (LR: local_gemma3.py validate's)
    python benchmarks/bench_pruning.py --quick    # smoke test of the code paths: 1 epoch on 8 pairs, 4 scored
"""

from dataclasses import asdict, replace

import common  # first: puts the repository root on sys.path and silences progress bars

import torch  # noqa: E402
import offline  # noqa: E402
import yapo  # noqa: E402

FULL = {"behavior": "toy_sentiment", "epochs": None, "ks": [8, 32, 128, "all"], "max_train_pairs": None,
        "max_test_pairs": None}                                   # epochs None: --tiny's
QUICK = FULL | {"epochs": 1, "max_train_pairs": 8, "max_test_pairs": 4}


def scores_at(model, tok, sae, v, pairs, args):
    """multiplier -> evaluate's row (behavior_score, accuracy, drift_kl)."""
    return {row["multiplier"]: row for row in yapo.evaluate(model, tok, sae, v, pairs, args)["rows"]}


def main(argv=None):
    p = common.parser(__file__, __doc__.strip().split("\n")[0])
    common.add_local_model(p, overrides=True)
    p.add_argument("--warmup-steps", type=int, default=None, help="warm-up steps (default: yapo.py's, or --tiny's)")
    opts = p.parse_args(argv)
    shapes = QUICK if opts.quick else FULL
    shapes = shapes | {k: getattr(opts, k) for k in ("behavior", "epochs") if getattr(opts, k) is not None}
    flags = (["--model", opts.model, "--sae", opts.sae, "--layer", str(opts.layer), "--lam", "auto"] if opts.model
             else ["--tiny"])
    if not opts.model:
        torch.set_num_threads(1)                                  # as yapo.py --tiny: tiny matrices lose on threads
    args = yapo.parse_args(flags + ["--behavior", shapes["behavior"], "--data", str(common.DATA), "--device", "cpu",
                                    "--multipliers", "-1", "0", "1", "--n-generations", "0"]
                           + (["--lr", str(opts.lr)] if opts.lr else [])
                           + (["--warmup-steps", str(opts.warmup_steps)] if opts.warmup_steps is not None else []))
    args = replace(args, epochs=shapes["epochs"] or args.epochs)
    train_pairs, test_pairs = yapo.load_pairs(args)
    model, tok, sae = yapo.setup(args)
    train_pairs, test_pairs = train_pairs[:shapes["max_train_pairs"]], test_pairs[:shapes["max_test_pairs"]]
    args = replace(args, lam=yapo.auto_lam(model, tok, sae, train_pairs, args))  # lam auto
    print(f"training on {len(train_pairs)} pairs for {args.epochs} epochs; scoring {len(test_pairs)} held-out pairs")
    v, history = yapo.train(model, tok, sae, train_pairs, args)

    rows = []
    for k in shapes["ks"]:
        # "all" scores the unpruned vector with the full SAE: the reference every K is compared with
        v_k, sae_k = (v, sae) if k == "all" else offline.prune(v, sae, k)
        s = scores_at(model, tok, sae_k, v_k, test_pairs, args)
        rows.append({"k": k if k != "all" else f"all ({v.numel()})", "latents": v_k.numel(),
                     "norm_share": (v_k.norm() / v.norm()).item(),
                     "score_minus_1": s[-1.0]["behavior_score"], "score_0": s[0.0]["behavior_score"],
                     "score_plus_1": s[1.0]["behavior_score"],
                     "margin_minus_1": s[-1.0].get("margin"), "margin_plus_1": s[1.0].get("margin"),
                     "accuracy_minus_1": s[-1.0]["accuracy"], "accuracy_plus_1": s[1.0]["accuracy"],
                     "drift_kl_plus_1": s[1.0]["drift_kl"],
                     "effect": s[1.0]["behavior_score"] - s[-1.0]["behavior_score"]})
    full_effect = rows[-1]["effect"]
    for r in rows:
        r["share_of_effect"] = r["effect"] / full_effect if full_effect else None
    latents = offline.top_latents(v, sae, 8)                         # what the strongest latents read
    listed = latents["positive"] + latents["negative"]
    reads = offline.latent_contexts(model, tok, sae, train_pairs, args.layer, [t["latent"] for t in listed])
    for t in listed:
        t["reads"] = reads[t["latent"]]

    results = {"benchmark": "pruning", "quick": opts.quick, "shapes": shapes | {"d_sae": v.numel(),
               "train_pairs": len(train_pairs), "test_pairs": len(test_pairs), "steps": len(history)},
               "args": asdict(args) | {"data": common.DATA.name}, "machine": common.machine(),
               "tiny": not opts.model,
               "vector": {"l0": int((v != 0).sum()), "norm": v.norm().item(), "final_loss": history[-1]["loss"]},
               "rows": rows, "latents": latents,
               "note": (f"{args.model} with the SAE {args.sae} at layer {args.layer}." if opts.model else
                        common.TINY_NOTE) + f" The scores are deterministic (log-probs, no sampling), but "
                       f"{len(test_pairs)} held-out pairs are a small sample."}

    print(f"\nv: L0 {results['vector']['l0']} of {v.numel()} latents, norm {v.norm():.3f}; "
          f"last training loss {history[-1]['loss']:.3f}"
          + ("  [QUICK: a smoke test; 1 epoch on 8 pairs, 4 scored]" if opts.quick else ""))
    common.print_table(rows, [("k", "K"), ("norm_share", "|v_K|/|v|"), ("score_minus_1", "score m=-1"),
                              ("score_0", "m=0"), ("score_plus_1", "m=+1"), ("effect", "effect (+1 - -1)"),
                              ("share_of_effect", "share of effect"), ("margin_minus_1", "margin m=-1"),
                              ("margin_plus_1", "margin m=+1"), ("drift_kl_plus_1", "drift KL m=+1")])
    print("\nthe strongest latents of v, and where each fires most in the training texts:")
    for t in listed:
        reads = "  ".join(repr(r["context"]) for r in t["reads"][:3]) or "(on no token here but <bos>)"
        print(f"  {t['latent']:>6} {t['value']:+.4f}  {reads}")
    print("\n" + results["note"])
    common.write_json(opts.out, results)
    return results


if __name__ == "__main__":
    main()
