"""Greedy generation speed, steered and not, on the Gemma-2-shaped random model of bench_train_step.py
(256,000-token vocabulary, SAE of 4096 latents at layer 2):

  unsteered      no hook
  dense          BiPO's hook, h + v
  sparse full    YaPO's hook (yapo.steer) with a vector over all 4096 latents
  sparse top-64  the same vector pruned to its 64 largest |v_i| by offline.prune, whose restricted SAE makes
                 the hook encode and decode 64 latents instead of 4096

Every variant answers the same prompt with the same number of new tokens (min_new_tokens = max_new_tokens,
do_sample=False). The variants take turns, in a rotating order, for several repeats, so that a change in the
machine's load hits them all alike; tokens/s comes from the median time. The time includes the prompt's
prefill (steered too), as a user of yapo.generate would see it.

Decoding one token streams the whole 256,000 x 256 LM head from memory, so on a shared machine the
generation times wander by several percent, more than the hooks cost. The hook is therefore also timed on
its own (yapo.steer on one token's residual stream, many calls): its cost next to the per-token time is the
low-noise figure.

    python benchmarks/bench_generate.py            # the figures (about a minute on 2 cores)
    python benchmarks/bench_generate.py --quick    # smoke test of the code paths: tiny shapes, few tokens
"""

import time
from contextlib import nullcontext

import common  # first: puts the repository root on sys.path

import torch  # noqa: E402
import offline  # noqa: E402
import yapo  # noqa: E402

FULL = {"vocab_size": 256_000, "hidden_size": 256, "layers": 4, "layer": 2, "d_sae": 4096, "l0": 50,
        "calibration_ids": [8, 128], "prompt_len": 115, "batch": 1, "new_tokens": 32, "top_k": 64, "repeats": 15,
        "hook_calls": 500, "hook_repeats": 7, "threads": None}                # None: torch's default
QUICK = FULL | {"vocab_size": 2_048, "hidden_size": 64, "layers": 3, "d_sae": 256, "l0": 16,
                "calibration_ids": [2, 32], "prompt_len": 12, "new_tokens": 3, "repeats": 2,
                "hook_calls": 10, "hook_repeats": 2, "threads": 1}
TARGET = 0.95  # top-64 sparse steering within 5% of unsteered tokens/s


def variants(model, sae, shapes):
    """name -> (v, sae) for yapo.steering, or None for no hook. Random vectors: only the cost matters here."""
    gen = torch.Generator().manual_seed(0)
    v_sparse = torch.randn(shapes["d_sae"], generator=gen) * 0.1          # every latent non-zero
    v_top, sae_top = offline.prune(v_sparse, sae, shapes["top_k"])
    return {"unsteered": None,
            "dense": (torch.randn(model.config.hidden_size, generator=gen), None),
            "sparse full": (v_sparse, sae),
            f"sparse top-{shapes['top_k']}": (v_top, sae_top)}


@torch.no_grad()
def hook_microseconds(steer, batch, d_model, calls, repeats):
    """Median time of one yapo.steer call on a decoding step's residual stream [batch, 1, d_model]."""
    if steer is None:
        return 0.0
    h = torch.randn(batch, 1, d_model)
    for _ in range(min(20, calls)):                               # warm-up
        yapo.steer(h, steer[0], 1.0, steer[1])
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            yapo.steer(h, steer[0], 1.0, steer[1])
        per_call.append((time.perf_counter() - t0) / calls)
    return common.median(per_call) * 1e6


@torch.no_grad()
def generate_seconds(model, ids, new_tokens, layer, steer):
    """Seconds for one greedy generation of exactly `new_tokens` tokens per row."""
    hook = nullcontext() if steer is None else yapo.steering(model, layer, steer[0], 1.0, steer[1])
    with hook:
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        seconds = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens, "every variant must generate the same length"
    return seconds


def main(argv=None):
    opts = common.parser(__file__, __doc__.strip().split("\n")[0]).parse_args(argv)
    shapes = QUICK if opts.quick else FULL
    if shapes["threads"]:
        torch.set_num_threads(shapes["threads"])
    load_before = common.machine()["load_average_1_5_15min"]
    model = common.gemma2_shaped(shapes["vocab_size"], shapes["hidden_size"], shapes["layers"])
    sae = common.calibrated_sae(model, shapes["layer"], shapes["d_sae"], shapes["l0"],
                                common.random_ids(*shapes["calibration_ids"], shapes["vocab_size"]))
    ids = common.random_ids(shapes["batch"], shapes["prompt_len"], shapes["vocab_size"], seed=1)
    steers = variants(model, sae, shapes)
    run = lambda steer: generate_seconds(model, ids, shapes["new_tokens"], shapes["layer"], steer)

    for steer in steers.values():                                 # warm-up: first calls allocate and cache
        run(steer)
    times = {name: [] for name in steers}
    names = list(steers)
    for r in range(shapes["repeats"]):
        for name in names[r % len(names):] + names[:r % len(names)]:   # rotate who goes first
            times[name].append(run(steers[name]))

    tokens = shapes["batch"] * shapes["new_tokens"]
    base = tokens / common.median(times["unsteered"])
    ms_per_token = 1000 * common.median(times["unsteered"]) / shapes["new_tokens"]   # prefill included
    rows = {}
    for name, ts in times.items():
        hook_us = hook_microseconds(steers[name], shapes["batch"], model.config.hidden_size,
                                    shapes["hook_calls"], shapes["hook_repeats"])
        rows[name] = {"median_s": common.median(ts), "tokens_per_s": tokens / common.median(ts),
                      "relative_to_unsteered": tokens / common.median(ts) / base, "seconds": ts,
                      "hook_us_per_token": hook_us, "hook_share_of_token_time": hook_us / (1000 * ms_per_token)}
    top = rows[f"sparse top-{shapes['top_k']}"]["relative_to_unsteered"]
    results = {"benchmark": "generate", "quick": opts.quick, "shapes": shapes,
               "machine": common.machine() | {"load_average_before": load_before},
               "measured": ("seconds per model.generate call (prefill + new_tokens greedy steps, KV cache on), "
                            "median over repeats after one warm-up call per variant; tokens/s = batch * "
                            "new_tokens / median seconds. hook_us_per_token: median time of one yapo.steer call "
                            "on a [batch, 1, d_model] residual stream; hook_share_of_token_time: that over the "
                            "unsteered generation time per new token"),
               "unsteered_ms_per_token": ms_per_token,
               "variants": rows, "target": {"top_k_relative_at_least": TARGET, "met": top >= TARGET},
               "note": common.RANDOM_MODEL_NOTE}

    print(f"prompt {shapes['prompt_len']} tokens, batch {shapes['batch']}, {shapes['new_tokens']} new tokens, "
          f"vocab {shapes['vocab_size']}, {shapes['repeats']} repeats"
          + ("  [QUICK: tiny shapes, a smoke test; the speeds and target mean nothing]" if opts.quick else ""))
    common.print_table([{"variant": n} | r for n, r in rows.items()],
                       [("variant", "variant"), ("median_s", "median s"), ("tokens_per_s", "tokens/s"),
                        ("relative_to_unsteered", "vs unsteered"), ("hook_us_per_token", "hook µs/token"),
                        ("hook_share_of_token_time", "hook / token time")])
    print(f"unsteered: {ms_per_token:.1f} ms per new token (prefill included)")
    print(f"\ntop-{shapes['top_k']} sparse at {top:.3f} of unsteered tokens/s: target >= {TARGET} "
          f"{'met' if top >= TARGET else 'MISSED'}")
    common.write_json(opts.out, results)
    return results


if __name__ == "__main__":
    main()
