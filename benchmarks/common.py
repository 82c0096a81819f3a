"""Helpers shared by the benchmark scripts: command line, the Gemma-2-shaped random model and its random
SAE, random token batches, memory readings, tables and JSON. Each script in benchmarks/ imports this first."""

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")   # yapo.train's progress bar would bury the tables (read at tqdm import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally; never wait on a hub lookup

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "data_sample.jsonl"
sys.path.insert(0, str(ROOT))                 # yapo.py lives at the repository root

import torch  # noqa: E402
import transformers  # noqa: E402

import yapo  # noqa: E402

RANDOM_MODEL_NOTE = ("Random model and random SAE: these numbers measure compute, memory or optimisation, "
                     "never real behaviour.")
TINY_NOTE = ("The committed toy model and SAE of yapo.py --tiny (benchmarks/toy/, made by offline.py in seconds): "
             "these numbers show what the method does to a tiny model, never real behaviour.")


# ---------------------------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    """Fills in --out after parsing, since its default depends on --quick."""
    stem = ""
    needs_sae = True

    def parse_known_args(self, args=None, namespace=None):
        opts, rest = super().parse_known_args(args, namespace)
        if getattr(opts, "model", None) and opts.layer is None:
            self.error("--model needs --layer: the layer its SAE reads (10 for benchmarks/local/)")
        if getattr(opts, "model", None) and self.needs_sae and opts.sae is None:
            self.error("--model needs --sae: the SAE folder trained on it (benchmarks/sae-gemma-3-270m-L10)")
        if opts.out is None:
            opts.out = str((RESULTS / "quick" if opts.quick else RESULTS) / (self.stem + ".json"))
        return opts, rest


def parser(script_file, description, epilog=None):
    """--quick for a smoke test and --out for the JSON path (default benchmarks/results/<script stem>.json, or
    benchmarks/results/quick/<script stem>.json with --quick, so that a smoke test never overwrites a figure)."""
    p = _Parser(description=description, epilog=epilog, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.stem = Path(script_file).stem
    p.add_argument("--quick", action="store_true", help="tiny shapes, few steps: a smoke test, not a figure")
    p.add_argument("--out", default=None, help="the JSON (default: benchmarks/results/[quick/]<script>.json)")
    return p


def add_local_model(p, needs_sae=True, overrides=False):
    """--model, --sae, --layer: a local model folder and the SAE trained on it (benchmarks/local_gemma3.py) instead
    of the toy; with `overrides`, also --behavior, --lr, --epochs over the script's own shapes."""
    p.needs_sae = needs_sae
    p.add_argument("--model", default=None, help="a local model folder, with --layer (default: the toy)")
    p.add_argument("--sae", default=None, help="its SAE folder" + ("" if needs_sae else "; without one, v is dense"))
    p.add_argument("--layer", type=int, default=None, help="the layer the SAE reads and the hook steers")
    if overrides:
        p.add_argument("--behavior", default=None, help="whose pairs (default: the script's)")
        p.add_argument("--lr", type=float, default=None, help="the learning rate (default: the script's)")
        p.add_argument("--epochs", type=int, default=None, help="passes over the pairs (default: the script's)")


# ---------------------------------------------------------------------------------------------- models and data

def with_method(flags, method):
    """yapo.py flags for one --method: CAA and SAS lose any --lam (their lam is 1, and yapo.py refuses another)."""
    if method in ("caa", "sas"):
        flags = [f for i, f in enumerate(flags) if not (f.startswith("--lam") or i and flags[i - 1] == "--lam")]
    return flags + ["--method", method]


def gemma2_shaped(vocab_size, hidden_size=256, layers=4, intermediate_size=1024, seed=0):
    """A random Gemma-2 (float32, eager attention). Only the shapes are Gemma's: with its 256,000-token
    vocabulary the embedding and LM head dominate the cost, as they do for Gemma-2-2B on a small batch."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          intermediate_size=intermediate_size, attn_implementation="eager")
    return Gemma2ForCausalLM(config).eval()


def random_sae(d_in, d_sae, layer, seed=0, decoder_norm=1.0, model_name="random-gemma2-shaped"):
    """A random JumpReLU SAE reading blocks.<layer>.hook_resid_post: decoder rows of length `decoder_norm`,
    encoder = their unit directions transposed, thresholds 0 (see calibrate_thresholds). The benchmarks keep
    their own copy, so that they measure the same random SAE whatever yapo.py's offline stand-ins become."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig.from_dict({"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae,
                                                   "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post",
                                                                "model_name": model_name}}))
    directions = torch.randn(d_sae, d_in, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    sae.load_state_dict({"W_dec": directions * decoder_norm, "W_enc": directions.T.contiguous(),
                         "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in), "threshold": torch.zeros(d_sae)})
    return sae


def calibrate_thresholds(sae, h, l0):
    """Set a JumpReLU SAE's thresholds so that about `l0` latents fire per token of h [N, d_in]."""
    with torch.no_grad():
        pre = sae.process_sae_in(h) @ sae.W_enc + sae.b_enc             # [N, d_sae]
        sae.threshold.data = pre.float().quantile(1 - l0 / sae.cfg.d_sae, dim=0).clamp(min=0).to(sae.dtype)


def calibrated_sae(model, layer, d_sae, l0, sample_ids, seed=0, attention_mask=None):
    """A random JumpReLU SAE at `layer`: decoder rows as long as the median residual-stream norm of the
    sample's (unpadded) tokens, thresholds set so that about `l0` latents fire per token."""
    h = yapo.residual_stream(model, layer, sample_ids, attention_mask)                 # [B, T, d_model]
    h = h.flatten(0, 1) if attention_mask is None else h[attention_mask.bool()]        # [N, d_model]
    sae = random_sae(model.config.hidden_size, d_sae, layer, seed, decoder_norm=h.norm(dim=-1).median().item())
    calibrate_thresholds(sae, h, l0)
    return sae


def mean_l0(sae, model, layer, ids):
    """Latents that fire per token, averaged: checks the calibration."""
    with torch.no_grad():
        return (sae.encode(yapo.residual_stream(model, layer, ids)) > 0).sum(-1).float().mean().item()


def random_prompt(length, vocab_size, gen):
    """<bos> then random ids (ids 0-3 are Gemma's special tokens, so they are left out)."""
    return [2] + torch.randint(4, vocab_size, (length - 1,), generator=gen).tolist()


def random_ids(rows, length, vocab_size, seed=0):
    """[rows, length] random prompts, e.g. to calibrate an SAE's thresholds on."""
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor([random_prompt(length, vocab_size, gen) for _ in range(rows)])


def random_examples(prompt_lens, response_len, vocab_size, seed=0):
    """One (prompt, chosen, rejected) triple of id lists per prompt length, as yapo.tokenize_pair returns
    them. Prompts of different lengths, as real ones are, so that the batch has padding."""
    gen = torch.Generator().manual_seed(seed)
    response = lambda: torch.randint(4, vocab_size, (response_len,), generator=gen).tolist()
    return [(random_prompt(n, vocab_size, gen), response(), response()) for n in prompt_lens]


# ---------------------------------------------------------------------------------------------- measuring

def median(xs):
    return statistics.median(xs) if xs else None


def _status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_mb():
    """Resident memory of this process now (Linux VmRSS)."""
    return _status_kb("VmRSS") / 1024


def reset_peak_rss():
    """Restart the peak-RSS counter (Linux >= 4.0: write 5 to /proc/self/clear_refs), so the next
    peak_rss_mb() covers only what follows. Returns False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    """Highest resident memory since the process started or since reset_peak_rss (Linux VmHWM)."""
    return _status_kb("VmHWM") / 1024


def machine():
    """What the numbers were measured on; the load average shows whether other work shared the CPUs."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_kernels": torch.backends.cpu.get_cpu_capability(),   # AVX2, AVX512: changes what training builds
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}


# ---------------------------------------------------------------------------------------------- output

def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header)."""
    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))


def markdown_table(rows, columns):
    """The same table as print_table, as GitHub markdown."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- statistics

def paired_interval(a, b, clusters):
    """YaPO minus a baseline on the same held-out pairs, with an interval that counts what is random: a model with
    two variance components. a: [runs_a, n] and b: [runs_b, n] per-pair values (runs: seeds; a seed-independent
    method has one run); clusters: n ids, one per group of pairs that are not independent (both forms of a culture
    question share one; elsewhere a pair is its own). The variance of the mean difference is the cluster-robust
    variance over clusters of the seed-averaged differences plus, for each method with several runs, the variance
    of its run means over the number of runs; the 95 % interval and the p-value of "no difference" use Student's t
    with Welch-Satterthwaite degrees of freedom (clusters - 1, runs - 1 for each part)."""
    from scipy import stats
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    d = a.mean(0) - b.mean(0)                                                   # [n] seed-averaged differences
    mean = d.mean().item()
    ids = sorted(set(clusters), key=list(clusters).index)
    sums = torch.stack([d[[k for k, c in enumerate(clusters) if c == i]].sum() for i in ids])
    sizes = torch.tensor([list(clusters).count(i) for i in ids], dtype=torch.float64)
    parts = [(len(ids) / (len(ids) - 1) * ((sums - mean * sizes) ** 2).sum().item() / len(d) ** 2, len(ids) - 1)]
    parts += [(x.mean(1).var().item() / len(x), len(x) - 1) for x in (a, b) if len(x) > 1]
    var = sum(v for v, _ in parts)
    df = var ** 2 / sum(v ** 2 / k for v, k in parts if v > 0) if var > 0 else float("inf")
    half = stats.t.ppf(0.975, df) * math.sqrt(var)
    p = 2 * stats.t.sf(abs(mean) / math.sqrt(var), df) if var > 0 else float(mean == 0)
    return {"difference": mean, "ci95": half, "df": df, "p": p, "clusters": len(ids), "runs": [len(a), len(b)]}


def holm(p_values, alpha=0.05):
    """Holm's step-down correction across a family of tests: which of them reject at family-wise level alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    reject = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break                                                 # this one and every larger p stand
        reject[i] = True
    return reject


def holm_verdicts(rows, alpha=0.05):
    """Each row (a comparison with its "difference", "p" and "n") gets a verdict after Holm's correction across all
    of them: 'better' or 'worse' where it rejects "no difference" at family-wise level alpha, else 'cannot tell'."""
    for r, reject in zip(rows, holm([r["p"] for r in rows], alpha)):
        r["verdict"] = ("better" if r["difference"] > 0 else "worse") if reject else f"cannot tell at n = {r['n']}"
    return rows


# ---------------------------------------------------------------------------------------------- JSON

def write_json(path, results):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {path}")
