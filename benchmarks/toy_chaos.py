"""Why the toy pins its arithmetic: its language model trained three times from the same seed, once more from the
same initial weights, once from initial weights moved by 1e-12, in float32 and in float64. Trained again, the weights
are the same bit for bit; moved by 1e-12, they end up elsewhere. So any rounding difference (another thread split of
a sum, other CPU kernels) makes another toy, which is why the toy is committed (benchmarks/toy/) rather than
rebuilt on every machine.

    python benchmarks/toy_chaos.py           # the toy of yapo.py --tiny, seed 0: about 3 minutes on one core
"""

import common  # first: puts the repository root on sys.path and silences progress bars

import offline  # noqa: E402
import torch  # noqa: E402
import yapo  # noqa: E402

EPSILON = 1e-12


def toy_corpus(seed=0):
    """The tokenizer and the sequences offline.build_toy trains the toy's language model on (the same call)."""
    train, _ = yapo.load_pairs(yapo.parse_args(["--tiny", "--seed", str(seed)]))
    tok, seqs, read = offline.toy_corpus(train, seed)
    return tok, seqs + read


def trained_weights(tok, seqs, dtype, nudge, seed, tokens):
    """The toy's language model after training, every initial weight moved by `nudge` first: one flat vector."""
    model = offline.tiny_model(tok, seed).to(dtype)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(nudge)
    offline.train_tiny_lm(model, seqs, tok.pad_token_id, tokens=tokens, seed=seed)
    return torch.cat([w.detach().flatten().double() for w in model.parameters()])


def main(argv=None):
    p = common.parser(__file__, __doc__.strip().split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="the toy's seed, as yapo.py --seed")
    opts = p.parse_args(argv)
    if not offline.pin_cpu_arithmetic():
        print("note: the toy's arithmetic could not be pinned here (see offline.pin_cpu_arithmetic)")
    tokens = 8_000 if opts.quick else 256_000                 # offline.build_toy's lm_tokens
    tok, seqs = toy_corpus(opts.seed)
    steps = max(1, round(tokens * len(seqs) / (16 * sum(map(len, seqs)))))   # as train_tiny_lm counts them
    rows = []
    for dtype in (torch.float32, torch.float64):
        first, again, nudged = (trained_weights(tok, seqs, dtype, nudge, opts.seed, tokens)
                                for nudge in (0.0, 0.0, EPSILON))
        rows.append({"dtype": str(dtype).removeprefix("torch."), "steps": steps,
                     "repeat_max_abs_difference": (first - again).abs().max().item(),
                     "nudged_max_abs_difference": (first - nudged).abs().max().item(),
                     "nudged_mean_abs_difference": (first - nudged).abs().mean().item(),
                     "mean_abs_weight": first.abs().mean().item()})
        r = rows[-1]
        print(f"{r['dtype']}: {steps} steps; trained again: max |dw| {r['repeat_max_abs_difference']:.3g}; "
              f"initial weights + {EPSILON:g}: max |dw| {r['nudged_max_abs_difference']:.3g}, mean "
              f"{r['nudged_mean_abs_difference']:.3g} (mean |w| {r['mean_abs_weight']:.3g})", flush=True)
    common.write_json(opts.out, {"benchmark": "toy_chaos", "quick": opts.quick, "seed": opts.seed,
                                 "epsilon": EPSILON, "rows": rows, "machine": common.machine(),
                                 "note": common.TINY_NOTE})


if __name__ == "__main__":
    main()
