"""Cost of one training step (forward + backward + AdamW) on a Gemma-2-shaped random model with Gemma-2's
256,000-token vocabulary, three ways:

  (a) floor  the frozen model's forward plus the backward to a dense vector at layer L: BiPO as yapo.py
             trains it (batch_loss with sae=None), no reference term, logits only where needed
  (b) yapo   YaPO as yapo.py trains it: batch_loss with the SAE hook (one encode, one decode-sized
             matmul), reference log-probs computed once before training (outside the timed step)
  (c) naive  a literal port of the paper: the reference log-probs by a second (no-grad) forward at every
             step, Eq. 3 with two decodes, logits and log_softmax at every position

Each variant runs in its own forked child process, so that its memory is measured alone: the peak resident
memory (VmHWM) during the steps minus the resident memory (VmRSS) just before the first step, i.e. after the
model, the SAE, the batch, the optimiser and (for b) the reference log-probs exist.

    python benchmarks/bench_train_step.py            # the figures (several minutes on 2 cores)
    python benchmarks/bench_train_step.py --quick    # smoke test of the code paths: tiny shapes, one step each
"""

import json
import multiprocessing
import os
import time
from contextlib import contextmanager

import common  # first: puts the repository root on sys.path and silences progress bars

import sae_lens  # noqa: E402, F401  (imported here, before the forks: every child inherits it instead of paying ~5 s)
import torch  # noqa: E402
import transformers.models.gemma2.modeling_gemma2  # noqa: E402, F401  (likewise)
import yapo  # noqa: E402

FULL = {"vocab_size": 256_000, "hidden_size": 256, "layers": 4, "layer": 2, "d_sae": 4096, "l0": 50,
        "calibration_ids": [8, 128], "prompt_lens": [111, 114, 116, 119], "response_len": 20, "rounds": 2,
        "warmup": 1, "steps": {"a_floor": 5, "b_yapo": 5, "c_naive": 3}, "threads": None}   # None: torch's default
QUICK = FULL | {"vocab_size": 2_048, "hidden_size": 64, "layers": 3, "d_sae": 256, "l0": 16,
                "calibration_ids": [2, 32], "prompt_lens": [9, 12], "response_len": 4, "rounds": 1,
                "steps": {"a_floor": 1, "b_yapo": 1, "c_naive": 1}, "threads": 1}
LOCAL = {"behavior": "power_seeking", "pairs": 4, "rounds": 1, "warmup": 1,   # --model: the first 4 training pairs
         "steps": {"a_floor": 4, "b_yapo": 4, "c_naive": 2}, "threads": None}
VARIANTS = ("a_floor", "b_yapo", "c_naive")
# For scale: figures NOT measured by this repo's scripts, quoted with how they were taken
AUTHORS_TRAINER_SAME_MACHINE = json.loads((common.RESULTS / "authors_trainer.json").read_text())


# ---------------------------------------------------------------------------------------------- (c) the naive port

def all_position_logprobs(model, batch):
    """log p(y|x) from the logits of every position, as a first port would write it: [N, T, V] logits
    and their log_softmax, although only the response positions are ever read."""
    logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().log_softmax(-1)
    token_logp = logp[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]   # position t predicts t+1
    return (token_logp * batch["response_mask"][:, 1:]).sum(-1)


@contextmanager
def two_decode_steering(model, layer, v, coeff, sae):
    """Eq. 3 exactly as written: h' = Dec(ReLU(z + coeff*v)) + (h - Dec(z)), two decodes per token."""
    def hook(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        z = sae.encode(h)
        steered = sae.decode(torch.relu(z + coeff * v)) + (h - sae.decode(z))
        return (steered,) + output[1:] if isinstance(output, tuple) else steered

    handle = yapo.decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- the three losses

def floor_loss(model, sae, v, batch, args):
    """(a): BiPO's hook (h + d*lam*v), no reference (zeros), yapo.py's response-only logits."""
    zeros = torch.zeros(len(batch["input_ids"]) // 2)
    return lambda d: yapo.batch_loss(model, None, v, batch, zeros, zeros, d, args)[0]


def yapo_loss(model, sae, v, batch, args, examples):
    """(b): the reference log-probs once, here, before any timed step; then one steered forward per step."""
    with torch.no_grad():
        ref_w, ref_l = yapo.pair_logprobs(model, examples, len(examples), model.config.pad_token_id)
    return lambda d: yapo.batch_loss(model, sae, v, batch, ref_w, ref_l, d, args)[0]


def naive_loss(model, sae, v, batch, args):
    """(c): the reference forward repeated at every step, two decodes, logits everywhere."""
    B = len(batch["input_ids"]) // 2

    def loss(d):
        with torch.no_grad():
            ref = all_position_logprobs(model, batch)
        with two_decode_steering(model, args.layer, v, d * args.lam, sae):
            logp = all_position_logprobs(model, batch)
        return yapo.yapo_loss(logp[:B], logp[B:], ref[:B], ref[B:], d, args.beta)[0]

    return loss


def training_step(loss_fn, v, args):
    """What yapo.train does with a loss: backward, clip, AdamW step (the LR schedule is left out)."""
    opt = torch.optim.AdamW([v], lr=args.lr)

    def step(d):
        loss = loss_fn(d)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([v], args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ---------------------------------------------------------------------------------------------- one variant, in a child

def build(shapes):
    """Model, SAE and one batch, identical in every child (same seeds): random, or with --model the real ones and
    the first training pairs of one behaviour through the chat template."""
    if shapes.get("model"):
        model, tok = yapo.load_model(shapes["model"], torch.device("cpu"), torch.float32)
        sae = yapo.load_sae(shapes["sae"], "", "cpu", torch.float32)
        pairs, _ = yapo.load_pairs(yapo.Args(behavior=shapes["behavior"], data=str(common.DATA)))
        examples = [yapo.tokenize_pair(tok, p) for p in pairs[:shapes["pairs"]]]
        model.requires_grad_(False)
        sae.requires_grad_(False)
        prompts = yapo.collate([(x, []) for x, _, _ in examples], tok.pad_token_id, "cpu")["input_ids"]
        return model, sae, examples, prompts
    model = common.gemma2_shaped(shapes["vocab_size"], shapes["hidden_size"], shapes["layers"])
    sample = common.random_ids(*shapes["calibration_ids"], shapes["vocab_size"])   # tokens to set the thresholds
    sae = common.calibrated_sae(model, shapes["layer"], shapes["d_sae"], shapes["l0"], sample)
    model.requires_grad_(False)
    sae.requires_grad_(False)
    examples = common.random_examples(shapes["prompt_lens"], shapes["response_len"], shapes["vocab_size"], seed=1)
    return model, sae, examples, sample


def run_variant(name, shapes):
    """Build, set up `name`, then warm-up and timed steps with alternating d. Runs in a fresh child."""
    if shapes["threads"]:
        torch.set_num_threads(shapes["threads"])                  # in the child: the parent must stay torch-free
    model, sae, examples, sample = build(shapes)
    args = yapo.Args(layer=shapes["layer"])                       # paper defaults: lam 1, beta 0.1, lr 5e-4
    batch = yapo.collate_pairs(examples, model.config.pad_token_id, "cpu")
    size = model.config.hidden_size if name == "a_floor" else sae.cfg.d_sae
    v = torch.zeros(size, requires_grad=True)                     # v = 0: the first step is unsteered, as in train
    loss_fn = {"a_floor": lambda: floor_loss(model, sae, v, batch, args),
               "b_yapo": lambda: yapo_loss(model, sae, v, batch, args, examples),
               "c_naive": lambda: naive_loss(model, sae, v, batch, args)}[name]()
    step = training_step(loss_fn, v, args)

    baseline = common.rss_mb()
    peak_was_reset = common.reset_peak_rss()
    wall, cpu, losses = [], [], []
    for i in range(shapes["warmup"] + shapes["steps"][name]):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(1.0 if i % 2 == 0 else -1.0))
        if i >= shapes["warmup"]:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = common.peak_rss_mb()
    return {"wall_s": wall, "cpu_s": cpu, "losses": losses, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
            "peak_growth_mb": peak - baseline, "peak_reset": peak_was_reset,
            "batch_shape": list(batch["input_ids"].shape),
            "sae_l0": common.mean_l0(sae, model, shapes["layer"], sample)}


def in_child(name, shapes):
    """Fork, not spawn: the child inherits the modules imported above (importing them costs ~10 s), and the parent
    has not run any torch op yet, so no OpenMP threads exist to be broken by the fork."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(run_variant, (name, shapes))


# ---------------------------------------------------------------------------------------------- main

def summarise(runs):
    """Merge the rounds of one variant: medians over every timed step, the largest peak."""
    wall = [t for r in runs for t in r["wall_s"]]
    cpu = [t for r in runs for t in r["cpu_s"]]
    return {"median_step_s": common.median(wall), "median_cpu_s": common.median(cpu), "step_s": wall,
            "peak_growth_mb": max(r["peak_growth_mb"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "baseline_rss_mb": runs[0]["baseline_rss_mb"], "peak_reset": all(r["peak_reset"] for r in runs),
            "losses_first_round": runs[0]["losses"]}


def main(argv=None):
    p = common.parser(__file__, __doc__.strip().split("\n")[0])
    common.add_local_model(p)
    opts = p.parse_args(argv)
    shapes = QUICK if opts.quick else FULL
    if opts.model:
        shapes = LOCAL | {"model": opts.model, "sae": opts.sae, "layer": opts.layer}
    load_before = [round(x, 2) for x in os.getloadavg()]           # no torch call in the parent before the forks
    runs = {name: [] for name in VARIANTS}
    for r in range(shapes["rounds"]):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]      # alternate the order: slow drifts in load cancel
        for name in order:
            print(f"round {r + 1}/{shapes['rounds']}: {name} ...", flush=True)
            runs[name].append(in_child(name, shapes))
    variants = {name: summarise(rs) for name, rs in runs.items()}
    a, b, c = (variants[n] for n in VARIANTS)
    first = runs["b_yapo"][0]
    ratios = {"b_over_a": b["median_step_s"] / a["median_step_s"], "c_over_b": c["median_step_s"] / b["median_step_s"],
              "b_over_a_cpu": b["median_cpu_s"] / a["median_cpu_s"], "c_over_b_cpu": c["median_cpu_s"] / b["median_cpu_s"]}
    targets = {"b_over_a_at_most_1.3": ratios["b_over_a"] <= 1.3, "c_over_b_at_least_2": ratios["c_over_b"] >= 2,
               "b_under_2_s_per_step": b["median_step_s"] < 2, "b_under_2_gb_peak_rss": b["peak_rss_mb"] < 2048}
    agree = max(abs(x - y) for x, y in zip(runs["b_yapo"][0]["losses"], runs["c_naive"][0]["losses"]))
    results = {
        "benchmark": "train_step", "quick": opts.quick, "shapes": shapes | {
            "batch_shape": first["batch_shape"], "sae_l0": first["sae_l0"]},
        "machine": common.machine() | {"load_average_before": load_before},
        "measured": ("wall_s and cpu_s: time.perf_counter / time.process_time around one step (loss, backward, "
                     "clip, AdamW), medians over the timed steps of all rounds after warm-up; peak_growth_mb: "
                     "VmHWM during the steps (reset just before) minus VmRSS just before the first step, in a "
                     "fresh forked child per variant and round; peak_rss_mb: that VmHWM, the whole process. Other work "
                     "on the machine slows every variant; the load averages show how busy it was"),
        "variants": variants, "ratios": ratios, "targets": targets,
        "b_c_loss_max_abs_difference": agree, "authors_trainer_same_machine": AUTHORS_TRAINER_SAME_MACHINE,
        "note": f"{opts.model} with the SAE {opts.sae}: real shapes and weights." if opts.model else
                common.RANDOM_MODEL_NOTE}

    rows = [{"variant": n, "step_s": v["median_step_s"], "cpu_s": v["median_cpu_s"], "growth_mb": v["peak_growth_mb"],
             "peak_mb": v["peak_rss_mb"]} for n, v in variants.items()]
    print(f"\nbatch {first['batch_shape']}" + (f" ({opts.model}, {shapes['behavior']}'s first {shapes['pairs']} "
          f"training pairs), SAE {opts.sae}" if opts.model else f" (prompts {shapes['prompt_lens']} + responses "
          f"{shapes['response_len']}), vocab {shapes['vocab_size']}, SAE {shapes['d_sae']} latents")
          + f", L0 {first['sae_l0']:.0f}"
          + ("  [QUICK: tiny shapes, a smoke test; the ratios and targets mean nothing]" if opts.quick else ""))
    common.print_table(rows, [("variant", "variant"), ("step_s", "median s/step"), ("cpu_s", "median CPU s/step"),
                              ("growth_mb", "peak growth MB"), ("peak_mb", "process peak MB")])
    print(f"\nb/a = {ratios['b_over_a']:.2f} (target <= 1.3)   c/b = {ratios['c_over_b']:.2f} (target >= 2)")
    print("targets: " + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in targets.items()))
    print(f"(b) and (c) losses agree to {agree:.1e} (same computation, different cost)")
    t = AUTHORS_TRAINER_SAME_MACHINE
    print(f"for scale (full-run shapes, not measured here): the authors' released trainer took "
          f"{t['sparse_s_per_step']} s/step sparse and {t['dense_s_per_step']} s/step dense, peak RSS "
          f"{t['sparse_peak_rss_gb']} / {t['dense_peak_rss_gb']} GB, {t['forwards_per_step']} forwards per step; "
          f"run back to back, this script's full run gave (b) {t['this_script_back_to_back']['b_yapo_s_per_step']} "
          f"s/step at {t['this_script_back_to_back']['b_yapo_peak_rss_gb']} GB and (a) "
          f"{t['this_script_back_to_back']['a_floor_s_per_step']} s/step")
    print(f"load average before/after: {load_before} / {results['machine']['load_average_1_5_15min']} "
          f"on {results['machine']['nproc']} CPUs")
    common.write_json(opts.out, results)
    return results


if __name__ == "__main__":
    main()
