"""Cost of evaluation per held-out pair and multiplier, against the floor of one forward per distinct sequence.

For each pair and multiplier, yapo.evaluate needs log p(y_w|x) and log p(y_l|x) (behaviour score, accuracy,
margin), the next-token distribution right after x (drift) and, for an MCQ pair, the log-probability of each
option label after x in every cyclic order of the options (mcq_every_order). The distinct sequences are x + y_w,
x + y_l and x in each order, so the floor is one forward of each
(with the LM head on the positions that are read), plus one unsteered forward of x per call for the drift's
reference. Three ways, on the same pairs and multipliers:

  naive   evaluation as this repository first wrote it: the pair forward, a second forward of the prompt for
          the drift, and one whole sequence x + option per option and per cyclic order of the options, one pair
          at a time (19 sequences for a 4-option pair)
  yapo    yapo.evaluate: the pair forward, then one forward of the prompts that serves the drift and, through
          its key-value cache, every option's few tokens, several pairs per batch
  floor   the distinct sequences alone: x + y_w and x + y_l as yapo.pair_logprobs runs them, and x once

The naive and yapo results must agree (the JSON records the largest difference). Per pair and multiplier,
"sequences" counts the rows that go through the model from their first token, "continuations" the rows that
continue a cached prompt (an option's few tokens), "tokens" every position put through the model.

    python benchmarks/bench_evaluate.py --model benchmarks/local/gemma-3-270m \
        --sae benchmarks/sae-gemma-3-270m-L10 --layer 10 --out benchmarks/results/local_evaluate.json
    python benchmarks/bench_evaluate.py                                        # on the --tiny toy
    python benchmarks/bench_evaluate.py --quick                                # smoke test: 4 pairs, 1 repeat
"""

import dataclasses
import time
from contextlib import contextmanager

import common  # first: puts the repository root on sys.path and silences progress bars

import torch  # noqa: E402
import yapo  # noqa: E402

FULL = {"behavior": "culture_egypt", "pairs": 20, "multipliers": [-2.0, -1.0, 0.0, 1.0, 2.0], "repeats": 3}
QUICK = FULL | {"behavior": "power_seeking", "pairs": 4, "multipliers": [0.0, 1.0], "repeats": 1}
LOCAL = FULL | {"multipliers": [-1.0, 1.0], "repeats": 1}       # --model: a real model on a CPU is slow


# ---------------------------------------------------------------------------------------------- naive: as first written

@torch.no_grad()
def naive_evaluate(model, tok, sae, v, pairs, args):
    """The metrics of yapo.evaluate, computed as this repository first did: per multiplier the pair forward,
    a separate right-padded forward of each prompt for the drift, and every option as a whole sequence."""
    def next_token_logprobs(prompts):
        out = []
        for i in range(0, len(prompts), args.batch_size):
            batch = yapo.collate([(yapo.prompt_ids(tok, p), []) for p in prompts[i:i + args.batch_size]],
                                 tok.pad_token_id, model.device)
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            last = hidden[torch.arange(len(hidden), device=model.device), batch["prompt_lens"] - 1]
            out.append(yapo.lm_head_logits(model, last).float().log_softmax(-1))
        return torch.cat(out)

    def mcq_choices(mcq):
        picks = []
        for p in mcq:
            labels, options = yapo.option_ids(tok, p)
            batch = yapo.collate([(yapo.prompt_ids(tok, p["prompt"]), o) for o in options], tok.pad_token_id,
                                 model.device)
            picks.append(labels[yapo.sequence_logprobs(model, batch).argmax()])
        return picks

    tokenized = [yapo.tokenize_pair(tok, p) for p in pairs]
    mcq = [p for p in pairs if p["format"] == "mcq"]
    base = next_token_logprobs([p["prompt"] for p in pairs])
    rows = []
    for m in args.multipliers:
        with yapo.steering(model, args.layer, v, m * args.lam, sae):
            w, l = yapo.pair_logprobs(model, tokenized, args.batch_size, tok.pad_token_id)
            row = {"multiplier": m, "behavior_score": torch.sigmoid(w - l).mean().item(),
                   "accuracy": (w > l).float().mean().item(), "margin": (w - l).mean().item(),
                   "drift_kl": yapo.drift_kl(next_token_logprobs([p["prompt"] for p in pairs]), base).mean().item()}
            if mcq:
                picks = mcq_choices(mcq)
                row["mcq"] = yapo.mcq_metrics(mcq, picks, args)
                orders = [[yapo.rotate_options(p, k) for k in range(len(yapo.option_labels(p["prompt"])))] for p in mcq]
                right, position = [], []
                for turned in orders:                             # every cyclic order of one item's options
                    said = [picks[len(right)]] + mcq_choices(turned[1:])
                    right.append(sum(k == yapo.answer_label(q["chosen"]) for q, k in zip(turned, said)) / len(said))
                    position += [yapo.option_labels(q["prompt"]).index(k) for q, k in zip(turned, said)]
                row["mcq_every_order"] = yapo.mcq_metrics(mcq, right, args) | {
                    "position_share": [position.count(j) / len(position) for j in range(max(position) + 1)]}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- floor

@torch.no_grad()
def floor(model, tok, sae, v, pairs, args):
    """One forward of each distinct sequence: x + y_w and x + y_l (with their response log-probs), and x (with
    the LM head at its last position) in each cyclic order of its options, per multiplier; x once more unsteered."""
    tokenized = [yapo.tokenize_pair(tok, p) for p in pairs]
    turned = [yapo.prompt_ids(tok, yapo.rotate_options(p, k)["prompt"]) for p in pairs if p["format"] == "mcq"
              for k in range(1, len(yapo.option_labels(p["prompt"])))]

    def prompts(extra=()):
        xs = [x for x, _, _ in tokenized] + list(extra)
        for i in range(0, len(xs), args.batch_size):
            batch = yapo.collate([(x, []) for x in xs[i:i + args.batch_size]], tok.pad_token_id, model.device)
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            yapo.lm_head_logits(model, hidden[torch.arange(len(hidden)), batch["prompt_lens"] - 1])

    prompts()
    for m in args.multipliers:
        with yapo.steering(model, args.layer, v, m * args.lam, sae):
            yapo.pair_logprobs(model, tokenized, args.batch_size, tok.pad_token_id)
            prompts(turned)


# ---------------------------------------------------------------------------------------------- measuring

@contextmanager
def counting(model):
    """Counts what goes through the model's decoder stack: whole sequences (batch rows run from their first
    token), continuations of a cached prompt (an option's few tokens) and token positions."""
    counts = {"sequences": 0, "continuations": 0, "tokens": 0}
    forward = model.model.forward

    def counted(*a, **kw):
        ids = kw.get("input_ids", a[0] if a else None)
        counts["continuations" if kw.get("cache") is not None else "sequences"] += ids.shape[0]
        counts["tokens"] += ids.numel()
        return forward(*a, **kw)

    model.model.forward = counted
    try:
        yield counts
    finally:
        del model.model.forward                                   # back to the class's method


def measure(fn, model, repeats):
    """Median seconds of fn() over `repeats` runs after one warm-up, and what one run puts through the model."""
    with counting(model) as counts:                               # the warm-up, counted
        fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return common.median(seconds), seconds, counts


def largest_difference(a, b):
    """The largest |difference| between two lists of evaluate rows, over every number the first (the naive way)
    reports (MCQ included); the second (yapo.evaluate) may report more (its intervals, the number of pairs)."""
    def numbers(x, prefix=""):
        if isinstance(x, dict):
            return {k2: v2 for k, v in x.items() for k2, v2 in numbers(v, f"{prefix}{k}.").items()}
        return {prefix: float(x)} if isinstance(x, (int, float)) and x is not None else {}
    flat_a, flat_b = numbers({str(i): r for i, r in enumerate(a)}), numbers({str(i): r for i, r in enumerate(b)})
    assert flat_a.keys() <= flat_b.keys(), "yapo.evaluate lacks fields the naive way reports"
    return max(abs(flat_a[k] - flat_b[k]) for k in flat_a)


def main(argv=None):
    p = common.parser(__file__, __doc__.strip().split("\n")[0])
    common.add_local_model(p, needs_sae=False)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    opts = p.parse_args(argv)
    shapes = QUICK if opts.quick else LOCAL if opts.model else FULL
    if opts.threads or not opts.model:
        torch.set_num_threads(opts.threads or 1)                  # the toy's tiny matrices lose on threads
    flags = ["--behavior", shapes["behavior"], "--data", str(common.DATA), "--format", "mcq", "--n-generations", "0",
             "--device", "cpu"]
    flags += (["--model", opts.model, "--layer", str(opts.layer)] + (["--sae", opts.sae] if opts.sae else [])
              if opts.model else ["--tiny"])
    args = yapo.parse_args(flags + ["--method", "yapo" if opts.sae or not opts.model else "bipo"])
    args = dataclasses.replace(args, multipliers=shapes["multipliers"])
    train, test = yapo.load_pairs(args)
    model, tok, sae = yapo.setup(args)
    pairs = (test + train)[:shapes["pairs"]]                      # a cost benchmark: any MCQ pairs will do
    size = sae.cfg.d_sae if sae is not None else model.config.hidden_size
    v = torch.randn(size, generator=torch.Generator().manual_seed(0)).to(model.device)
    args = dataclasses.replace(args, lam=yapo.auto_lam(model, tok, sae, train, args) / v.abs().mean().item())  # visible
    print(f"{len(pairs)} MCQ pairs of {args.behavior}, {len(args.multipliers)} multipliers, "
          f"{'sparse' if sae is not None else 'dense'} random v; model {args.model}")

    runs = {"naive": lambda: naive_evaluate(model, tok, sae, v, pairs, args),
            "yapo": lambda: yapo.evaluate(model, tok, sae, v, pairs, args)["rows"],
            "floor": lambda: floor(model, tok, sae, v, pairs, args)}
    per = len(pairs) * len(args.multipliers)
    variants = {}
    for name, fn in runs.items():
        median_s, seconds, counts = measure(fn, model, shapes["repeats"])
        variants[name] = {"median_s": median_s, "seconds": seconds, "s_per_pair_per_multiplier": median_s / per,
                          "sequences_per_pair_per_multiplier": counts["sequences"] / per,
                          "continuations_per_pair_per_multiplier": counts["continuations"] / per,
                          "tokens_per_pair_per_multiplier": counts["tokens"] / per}
        print(f"{name:>6}: {median_s:.2f} s", flush=True)
    floor_s = variants["floor"]["median_s"]
    for v_ in variants.values():
        v_["over_floor"] = v_["median_s"] / floor_s
    difference = largest_difference(runs["naive"](), runs["yapo"]())

    results = {"benchmark": "evaluate", "quick": opts.quick, "model": args.model,
               "sae": args.sae if sae is not None else None,
               "layer": args.layer, "shapes": shapes | {"option_counts": sorted({len(yapo.option_labels(p["prompt"]))
                                                                                  for p in pairs})},
               "machine": common.machine(), "variants": variants, "naive_vs_yapo_max_abs_difference": difference,
               "target": "yapo over_floor <= 1.3, results identical to naive up to floating-point rounding",
               "note": (common.TINY_NOTE if not opts.model else f"{args.model}: cost only; the vector is random.")
                       + " Seconds are medians over repeats after one warm-up."}
    print()
    common.print_table([{"variant": k} | v_ for k, v_ in variants.items()],
                       [("variant", "variant"), ("s_per_pair_per_multiplier", "s / pair / m"),
                        ("over_floor", "x floor"), ("sequences_per_pair_per_multiplier", "sequences / pair / m"),
                        ("continuations_per_pair_per_multiplier", "option continuations / pair / m"),
                        ("tokens_per_pair_per_multiplier", "tokens / pair / m")])
    print(f"\nnaive vs yapo: largest difference in any reported number {difference:.2e}")
    common.write_json(opts.out, results)
    return results


if __name__ == "__main__":
    main()
