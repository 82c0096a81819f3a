"""How fast the optimisation converges, YaPO (sparse, in SAE latents) against BiPO (dense, in the residual
stream): the same power_seeking pairs from data_sample.jsonl, the same steps and paper defaults (lr 5e-4,
beta 0.1, lambda 1, batch 4), 3 seeds, on two random Gemma-2 sizes:

  tiny   yapo.tiny_setup: d_model 64, 4 layers, SAE of 512 latents at layer 2
  small  the same recipe at d_model 256, 6 layers, SAE of 2048 latents at layer 3

Per run: steps until the training loss first drops below 0.5 and below 0.1, and until the per-step
training accuracy (share of the batch's pairs with a positive margin) first reaches 1.0; the lowest loss
of any step and the mean loss over the last epoch. A seed changes the random model,
the SAE, the batch order and the directions d; the train/test split stays the same.

    python benchmarks/bench_convergence.py            # the figures and convergence.png (a few minutes)
    python benchmarks/bench_convergence.py --quick    # smoke test: 1 epoch on 12 pairs
"""

import statistics
import time
from pathlib import Path

import common  # first: puts the repository root on sys.path and silences progress bars

import torch  # noqa: E402
import yapo  # noqa: E402

FULL = {"behavior": "power_seeking", "epochs": 20, "max_train_pairs": None, "seeds": [0, 1, 2],
        "loss_thresholds": [0.5, 0.1],
        "sizes": {"tiny": {"hidden_size": 64, "layers": 4, "layer": 2, "d_sae": 512, "l0": 32},
                  "small": {"hidden_size": 256, "layers": 6, "layer": 3, "d_sae": 2048, "l0": 32}}}
QUICK = FULL | {"epochs": 1, "max_train_pairs": 12}
MODES = ("sparse", "dense")  # YaPO, BiPO


def small_setup(texts, seed, hidden_size, layers, layer, d_sae, l0):
    """yapo.tiny_setup's recipe at another size: a BPE tokenizer trained on the texts, a random Gemma-2,
    and a random SAE whose decoder rows are as long as the median residual-stream norm."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    tok = yapo.tiny_tokenizer(texts)
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=hidden_size // 4, max_position_embeddings=512, sliding_window=64,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    sample = tok(texts[:64], add_special_tokens=False, padding=True, return_tensors="pt")
    h = yapo.residual_stream(model, layer, sample["input_ids"])[sample["attention_mask"].bool()]
    sae = yapo.random_sae(hidden_size, d_sae, layer, seed, decoder_norm=h.norm(dim=-1).median().item())
    yapo.calibrate_thresholds(sae, h, l0)
    return model, tok, sae


def setup(size, spec, texts, seed):
    if size == "tiny":                                            # exactly what `yapo.py --tiny` trains on
        return yapo.tiny_setup(texts, seed, layer=spec["layer"], d_sae=spec["d_sae"], l0=spec["l0"])
    return small_setup(texts, seed, **spec)


def first_step(values, ok):
    """Optimizer updates made before the first step whose value satisfies `ok`; None if none does."""
    return next((i for i, x in enumerate(values) if ok(x)), None)


def one_run(model, tok, sae, mode, pairs, spec, seed, shapes):
    args = yapo.Args(tiny=True, behavior=shapes["behavior"], mode=mode, layer=spec["layer"], seed=seed,
                     epochs=shapes["epochs"])                     # everything else: paper defaults
    t0 = time.perf_counter()
    _, history = yapo.train(model, tok, sae if mode == "sparse" else None, pairs, args)
    losses, accs = [h["loss"] for h in history], [h["accuracy"] for h in history]
    last_epoch = [h["loss"] for h in history if h["epoch"] == args.epochs - 1]
    return {"loss": losses, "accuracy": accs, "seconds": time.perf_counter() - t0,
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
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), sharey=True)
    for ax, (size, by_mode) in zip(axes, runs.items()):
        for mode, label in zip(MODES, ("YaPO (sparse)", "BiPO (dense)")):
            losses = torch.tensor([r["loss"] for r in by_mode[mode]])    # [seeds, steps]
            steps = range(losses.shape[1])
            ax.plot(steps, losses.mean(0), label=label)
            ax.fill_between(steps, losses.min(0).values, losses.max(0).values, alpha=0.25)
        for t in shapes["loss_thresholds"]:
            ax.axhline(t, color="grey", ls=":", lw=1)
        spec = shapes["sizes"][size]
        ax.set_title(f"{size}: d_model {spec['hidden_size']}, {spec['layers']} layers, SAE {spec['d_sae']}", fontsize=10)
        ax.set_xlabel("step")
    axes[0].set_ylabel(f"training loss (mean, min-max over {len(shapes['seeds'])} seeds)")
    axes[0].legend()
    fig.suptitle("Random models: optimisation only, not behaviour", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = common.parser(__file__, __doc__.strip().split("\n")[0])
    p.add_argument("--png", default=None, help="the plot (default: convergence.png next to --out)")
    opts = p.parse_args(argv)
    shapes = QUICK if opts.quick else FULL
    png = Path(opts.png) if opts.png else Path(opts.out).parent / "convergence.png"
    train_pairs, test_pairs = yapo.load_pairs(common.DATA, shapes["behavior"])   # one split for every seed
    texts = [t for p in train_pairs + test_pairs for t in (p["prompt"], p["chosen"], p["rejected"])]
    train_pairs = train_pairs[:shapes["max_train_pairs"]]                       # all of them unless --quick

    runs, decoder_norms = {}, {}
    for size, spec in shapes["sizes"].items():
        runs[size], decoder_norms[size] = {mode: [] for mode in MODES}, []
        for seed in shapes["seeds"]:
            model, tok, sae = setup(size, spec, texts, seed)
            decoder_norms[size].append(sae.W_dec.norm(dim=1).mean().item())
            for mode in MODES:
                r = one_run(model, tok, sae, mode, train_pairs, spec, seed, shapes)
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
    plot(runs, shapes, png)
    note = (f"{common.RANDOM_MODEL_NOTE} These runs measure the optimisation, as the paper's convergence figure "
            f"does. Scale is not like for like: yapo.tiny_setup (and the small model here, built the same way) "
            f"sets every SAE decoder row to the median residual-stream norm (about "
            + ", ".join(f"{s} {statistics.mean(n):.1f}" for s, n in decoder_norms.items())
            + "), so one unit of a latent moves h by that much, while one unit of the dense vector moves one "
            "coordinate of h by 1; at the same learning rate (the paper's 5e-4 for both, as yapo.py --tiny uses) "
            "the sparse vector takes far larger steps in h. "
            "Per-step accuracy is over a batch of 4 pairs, so it can reach 1.0 by chance once v moves; the "
            "loss threshold is the steadier measure. Steps count optimizer updates before the first step "
            "that meets the condition (0 = the first step, with v = 0).")
    results = {"benchmark": "convergence", "quick": opts.quick, "shapes": shapes | {
               "train_pairs": len(train_pairs), "steps": len(runs["tiny"]["sparse"][0]["loss"])},
               "machine": common.machine(), "decoder_row_norm": {s: statistics.mean(n) for s, n in decoder_norms.items()},
               "summary": summary, "curves": curves(runs),
               "png": png.name, "note": note}

    steps = lambda s: "not reached" if s["mean"] is None else f"{s['mean']:.0f} ± {s['std']:.0f} ({s['reached']})"
    loss = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
    print(f"\n{results['shapes']['steps']} steps per run, seeds {shapes['seeds']}"
          + ("  [QUICK: 1 epoch on 12 pairs]" if opts.quick else ""))
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
