"""How fast the optimisation converges, YaPO (sparse, in SAE latents) against BiPO (dense, in the residual
stream), at equal settings: the same training pairs, the same steps, the same learning rate for both, lambda
auto (each vector's own typical scale, yapo.auto_lam), beta 0.1, batch 4, AdamW without weight decay, warm-up
over the first 10% of the steps, 3 seeds. The paper's own claim is of this kind: YaPO's loss falls below 0.1
within 150 steps while BiPO stays above 0.3 after 600 (Gemma-2-2B, lr 5e-4, lambda 1).

  tiny   the offline toy, exactly what `yapo.py --tiny` builds on the toy_sentiment training pairs (its
         shapes are read back from the model and SAE it returns), at --tiny's YaPO learning rate
  small  a random Gemma-2 at d_model 256, 6 layers, with a random JumpReLU SAE of 2048 latents at layer 3
         (decoder rows as long as the median residual-stream norm, thresholds set for ~32 active latents),
         on the toy's tokenizer: optimisation only
  local  with --model/--sae/--layer: a real model and its SAE (benchmarks/local_gemma3.py builds Gemma 3 270M
         and one), on --behavior's training pairs, with --lr and --epochs

Per run: steps until the training loss first drops below 0.5 and below 0.1, and until the per-step
training accuracy (share of the batch's pairs with a positive margin) first reaches 1.0; the lowest loss
of any step and the mean loss over the last epoch. A seed changes the batch order and the directions d, and
for tiny and small also the models and SAEs; the train/test split stays the same.

    python benchmarks/bench_convergence.py            # tiny and small, and convergence.png (a few minutes)
    python benchmarks/bench_convergence.py --model benchmarks/local/gemma-3-270m \
        --sae benchmarks/sae-gemma-3-270m-L10 --layer 10 --behavior power_seeking --lr 3e-3 --epochs 6 \
        --out benchmarks/results/local_convergence.json         # the real model: 6 runs of 60 steps (about 30 min)
    python benchmarks/bench_convergence.py --quick    # smoke test of the code paths: 1 seed, 1 epoch on 8 pairs
"""

import dataclasses
import math
import statistics
import time
from pathlib import Path

import common  # first: puts the repository root on sys.path and silences progress bars

import torch  # noqa: E402
import yapo  # noqa: E402

FULL = {"behavior": "toy_sentiment", "epochs": 10, "lr": 3e-3, "max_train_pairs": None, "seeds": [0, 1, 2],
        "loss_thresholds": [0.5, 0.1], "warmup_fraction": 0.1,
        "sizes": {"tiny": "the committed toy (benchmarks/toy/)",
                  "small": {"hidden_size": 256, "layers": 6, "layer": 3, "d_sae": 2048, "l0": 32}}}
QUICK = FULL | {"epochs": 1, "max_train_pairs": 8, "seeds": [0],
                "sizes": {"tiny": "the committed toy (benchmarks/toy/)",
                          "small": {"hidden_size": 64, "layers": 2, "layer": 1, "d_sae": 256, "l0": 16}}}
MODES = ("sparse", "dense")  # YaPO, BiPO


def tiny_setup(seed, behavior):
    """yapo.py --tiny's model, tokenizer and SAE (via yapo.setup, which also checks that they fit), and
    their shapes."""
    args = yapo.parse_args(["--tiny", "--behavior", behavior, "--seed", str(seed), "--device", "cpu"])
    model, tok, sae = yapo.setup(args)
    spec = {"hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers,
            "layer": args.layer, "d_sae": sae.cfg.d_sae}
    return model, tok, sae, spec


def small_setup(tok, texts, seed, hidden_size, layers, layer, d_sae, l0):
    """A random Gemma-2 of the given size on `tok`'s vocabulary, and a random SAE calibrated on its
    residual stream at `layer` (common.calibrated_sae)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=hidden_size // 4, max_position_embeddings=512, sliding_window=64,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    sample = tok(texts[:64], add_special_tokens=False, padding=True, return_tensors="pt")
    sae = common.calibrated_sae(model, layer, d_sae, l0, sample["input_ids"], seed, sample["attention_mask"])
    yapo.check_sae_fits_model(model, sae, layer)
    return model, tok, sae


def first_step(values, ok):
    """Optimizer updates made before the first step whose value satisfies `ok`; None if none does."""
    return next((i for i, x in enumerate(values) if ok(x)), None)


def one_run(model, tok, sae, mode, pairs, spec, seed, shapes):
    steps = shapes["epochs"] * math.ceil(len(pairs) / 4)
    args = yapo.Args(behavior=shapes["behavior"], method={"sparse": "yapo", "dense": "bipo"}[mode], layer=spec["layer"], seed=seed, epochs=shapes["epochs"],
                     lam="auto", lr=shapes["lr"], beta=0.1, batch_size=4, grad_accum=1, weight_decay=0.0,
                     warmup_steps=max(1, round(shapes["warmup_fraction"] * steps)))   # the same for both methods
    hook_sae = sae if mode == "sparse" else None
    args = dataclasses.replace(args, lam=yapo.auto_lam(model, tok, hook_sae, pairs, args))
    t0 = time.perf_counter()
    _, history = yapo.train(model, tok, hook_sae, pairs, args)
    losses, accs = [h["loss"] for h in history], [h["accuracy"] for h in history]
    last_epoch = [h["loss"] for h in history if h["epoch"] == args.epochs - 1]
    return {"loss": losses, "accuracy": accs, "seconds": time.perf_counter() - t0, "lam": args.lam,
            **{f"steps_to_loss_below_{t}": first_step(losses, lambda x: x < t) for t in shapes["loss_thresholds"]},
            "steps_to_accuracy_1": first_step(accs, lambda x: x >= 1.0),
            "min_loss": min(losses), "last_epoch_loss": statistics.mean(last_epoch)}


def spread(values):
    """mean and std over the seeds that got there, and how many did."""
    got = [x for x in values if x is not None]
    return {"mean": statistics.mean(got) if got else None, "std": statistics.pstdev(got) if got else None,
            "reached": f"{len(got)}/{len(values)}", "per_seed": values}


def curves(runs):
    """Per size and mode, each seed's per-step loss and accuracy (losses rounded: the JSON stays small)."""
    return {size: {mode: {"loss": [[round(x, 4) for x in r["loss"]] for r in rs],
                          "accuracy": [r["accuracy"] for r in rs]} for mode, rs in by_mode.items()}
            for size, by_mode in runs.items()}


def plot(runs, shapes, path):
    import matplotlib
    matplotlib.use("Agg")                                         # no display needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (size, by_mode) in zip(axes, runs.items()):
        for mode, label in zip(MODES, ("YaPO (sparse)", "BiPO (dense)")):
            losses = torch.tensor([r["loss"] for r in by_mode[mode]])    # [seeds, steps]
            steps = range(losses.shape[1])
            ax.plot(steps, losses.mean(0), label=label)
            ax.fill_between(steps, losses.min(0).values, losses.max(0).values, alpha=0.25)
        for t in shapes["loss_thresholds"]:
            ax.axhline(t, color="grey", ls=":", lw=1)
        spec = shapes["sizes"][size]
        ax.set_title(f"{size}: d_model {spec['hidden_size']}, {spec['layers']} layers, SAE {spec['d_sae']}",
                     fontsize=10)
        ax.set_xlabel("step")
    axes[0].set_ylabel(f"training loss (mean, min-max over {len(shapes['seeds'])} seeds)")
    axes[0].legend()
    fig.suptitle("Training loss at one learning rate for both methods, lambda auto", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = common.parser(__file__, __doc__.strip().split("\n")[0])
    p.add_argument("--png", default=None, help="the plot (default: convergence.png next to --out)")
    common.add_local_model(p, overrides=True)
    opts = p.parse_args(argv)
    shapes = QUICK if opts.quick else FULL
    shapes = shapes | {k: getattr(opts, k) for k in ("behavior", "lr", "epochs") if getattr(opts, k) is not None}
    png = Path(opts.png) if opts.png else Path(opts.out).with_suffix(".png") if opts.model else \
        Path(opts.out).parent / "convergence.png"
    if not opts.model:
        torch.set_num_threads(1)                                  # as yapo.py --tiny: small matrices lose on threads
    split = yapo.Args(behavior=shapes["behavior"], data=str(common.DATA))
    train_pairs, _ = yapo.load_pairs(split)                       # one split for every seed
    texts = [t for p in train_pairs for t in (p["prompt"], p["chosen"], p["rejected"])]
    if opts.model:
        local = yapo.Args(model=opts.model, sae=opts.sae, layer=opts.layer, device="cpu")
        local_model = yapo.setup(local)
        spec = {"hidden_size": local_model[0].config.hidden_size, "layers": local_model[0].config.num_hidden_layers,
                "layer": opts.layer, "d_sae": local_model[2].cfg.d_sae, "model": opts.model, "sae": opts.sae}
        shapes = shapes | {"sizes": {"local": spec}}
    sizes = dict(shapes["sizes"])                                 # "tiny" gets the shapes tiny_setup returns
    runs = {size: {mode: [] for mode in MODES} for size in sizes}
    decoder_norms = {size: [] for size in sizes}
    for seed in shapes["seeds"]:
        tiny = None if opts.model else tiny_setup(seed, shapes["behavior"])   # as yapo.py --tiny
        if tiny:
            sizes["tiny"] = tiny[3]
        for size, spec in sizes.items():
            model, tok, sae = (local_model if size == "local" else tiny[:3] if size == "tiny"
                               else small_setup(tiny[1], texts, seed, **spec))
            decoder_norms[size].append(sae.W_dec.norm(dim=1).mean().item())
            for mode in MODES:
                r = one_run(model, tok, sae, mode, train_pairs[:shapes["max_train_pairs"]], spec, seed, shapes)
                runs[size][mode].append(r)
                print(f"{size:>5} seed {seed} {mode:>6}: lowest loss {r['min_loss']:.3f}, last epoch "
                      f"{r['last_epoch_loss']:.3f}, " + ", ".join(f"loss < {t} at step {r[f'steps_to_loss_below_{t}']}"
                                                                  for t in shapes["loss_thresholds"])
                      + f", accuracy 1.0 at step {r['steps_to_accuracy_1']} ({r['seconds']:.0f} s)", flush=True)
    metrics = [f"steps_to_loss_below_{t}" for t in shapes["loss_thresholds"]] + [
        "steps_to_accuracy_1", "min_loss", "last_epoch_loss"]
    summary = [{"size": size, "mode": mode, "method": "YaPO" if mode == "sparse" else "BiPO"}
               | {m: spread([r[m] for r in rs]) for m in metrics}
               | {"seconds_per_run": statistics.mean(r["seconds"] for r in rs)}
               for size, by_mode in runs.items() for mode, rs in by_mode.items()]
    shapes = shapes | {"sizes": sizes}
    plot(runs, shapes, png)
    note = ((f"{opts.model} with the SAE {opts.sae} at layer {opts.layer}, {shapes['behavior']}: a real model. "
             if opts.model else f"{common.TINY_NOTE} The small size is a random model with a random SAE. ")
            + f"These runs measure the optimisation, as the paper's convergence figure does, at one learning rate "
            f"({shapes['lr']}) for both methods and lambda auto, each vector's own typical scale (in each run's "
            f"'lam'). One unit of a latent moves h by its SAE decoder row (mean row length "
            + ", ".join(f"{s} {statistics.mean(n):.2f}" for s, n in decoder_norms.items())
            + "), one unit of the dense vector one coordinate of h by 1. "
            "Per-step accuracy is over a batch of 4 pairs, so it can reach 1.0 by chance once v moves; the "
            "loss threshold is the steadier measure. Steps count optimizer updates before the first step "
            "that meets the condition (0 = the first step, with v = 0).")
    first = next(iter(runs.values()))["sparse"][0]
    results = {"benchmark": "convergence", "quick": opts.quick, "shapes": shapes | {
               "train_pairs": len(train_pairs[:shapes["max_train_pairs"]]), "steps": len(first["loss"])},
               "machine": common.machine(),
               "decoder_row_norm": {s: statistics.mean(n) for s, n in decoder_norms.items()},
               "summary": summary, "curves": curves(runs),
               "png": png.name, "note": note}

    steps = lambda s: "not reached" if s["mean"] is None else f"{s['mean']:.0f} ± {s['std']:.0f} ({s['reached']})"
    loss = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
    print(f"\n{results['shapes']['steps']} steps per run, seeds {shapes['seeds']}"
          + ("  [QUICK: a smoke test; 1 seed, 1 epoch on 8 pairs, a smaller 'small']" if opts.quick else ""))
    columns = [("size", "size"), ("method", "method")]
    columns += [(m, "steps to loss < " + m.rsplit("_", 1)[1]) for m in metrics[:-3]]
    columns += [("steps_to_accuracy_1", "steps to accuracy 1.0"), ("min_loss", "lowest loss"),
                ("last_epoch_loss", "last-epoch loss")]
    common.print_table([{k: r[k] if k in ("size", "method") else loss(r[k]) if k.endswith("loss") else steps(r[k])
                         for k, _ in columns} for r in summary], columns)
    print("\nNOTE: " + note)
    print(f"plot: {png}")
    common.write_json(opts.out, results)
    return results


if __name__ == "__main__":
    main()
