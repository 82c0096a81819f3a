"""
YaPO: steering vectors learned from preference pairs in the latent space of a sparse autoencoder.

One file: data -> the steering hook (Eq. 3) -> log-probs -> the bidirectional loss (Eq. 4) ->
training loop -> evaluation -> main. Read it top to bottom next to the paper.

    python yapo.py --tiny --behavior power_seeking   # offline: random tiny Gemma-2 + random SAE, < 1 min on CPU
    python yapo.py --behavior power_seeking          # Gemma-2-2B-it + Gemma Scope layer 15 (GPU, HF token)
    python yapo.py --behavior power_seeking --eval-only --vector runs/<run>/vector.safetensors
    python yapo.py --mode dense ...                  # the BiPO baseline: a dense vector in the residual stream

Each run writes runs/<behavior>_<mode>_<time>/ with vector.safetensors (saved every epoch) and results.json.

Deliberately left out: multi-GPU and quantised models, steering several layers at once, sampling-based
evaluation with an LLM judge, and benchmark suites such as MMLU (the README shows how to run an external
harness with the hook attached).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata

FORMAT_VERSION = "yapo-vector/1"


def arg(default, help, choices=None):
    """A dataclass field that also becomes a command-line flag (see parse_args)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Args:
    # what to steer
    behavior: str = arg("power_seeking", "which rows of --data to use (their `behavior` field)")
    data: str = arg("data_sample.jsonl", "preference pairs, .jsonl or .csv (see README: data format)")
    model: str = arg("google/gemma-2-2b-it", "hub id or local folder of a causal LM with model.model.layers")
    sae: str = arg("gemma-scope-2b-pt-res", "sae-lens release name, or a local folder written by sae.save_model")
    sae_id: str = arg("layer_15/width_65k/average_l0_68", "SAE id inside the release (ignored for a folder)")
    layer: int = arg(15, "steer the residual stream after this decoder layer (the SAE's blocks.L.hook_resid_post)")
    mode: str = arg("sparse", "sparse = YaPO (Eq. 3, v in SAE latents); dense = BiPO (h + d*lam*v)", ["sparse", "dense"])
    tiny: bool = arg(False, "offline: random tiny Gemma-2, tokenizer and SAE built on the spot (layer 2 of 4)")
    # the objective (Eq. 4)
    reference: str = arg("unsteered", "log p_0: the frozen model with steering off, or none", ["unsteered", "none"])
    beta: float = arg(0.1, "beta in Eq. 4: how sharply the sigmoid rewards the preference margin")
    lam: float = arg(1.0, "lambda: the steering strength during training; the vector is applied as d*lam*v")
    # optimisation (paper defaults)
    lr: float = arg(5e-4, "AdamW learning rate for v")
    epochs: int = arg(20, "passes over the training pairs")
    batch_size: int = arg(4, "preference pairs per step (each is a chosen and a rejected sequence)")
    warmup: float = arg(0.1, "fraction of steps with linear warm-up before the cosine decay")
    max_grad_norm: float = arg(1.0, "gradient clipping on v")
    test_fraction: float = arg(0.2, "held-out share of pairs that have no `split` field")
    seed: int = arg(0, "seed for the split, the batch order, the directions d and the tiny model")
    # evaluation
    multipliers: list = arg([-2.0, -1.0, 0.0, 1.0, 2.0], "evaluation sweep: steer with m*lam*v for each m")
    top_k: int = arg(0, "evaluate the sparse vector pruned to its top-K latents by |v| (0 = all)")
    n_generations: int = arg(3, "held-out prompts to answer greedily at each multiplier")
    max_new_tokens: int = arg(48, "length of those greedy answers")
    n_top_latents: int = arg(10, "latents to list when interpreting a sparse vector")
    # run
    eval_only: bool = arg(False, "skip training and evaluate --vector")
    vector: str = arg("", "a vector.safetensors to evaluate with --eval-only")
    out_dir: str = arg("runs", "each run writes a new folder in here")
    device: str = arg("auto", "auto (cuda if available), cpu or cuda")

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{flag(f.name)} {getattr(self, f.name)!r} is not one of {choices}")


def flag(name):
    return name.replace("_", "-")


def parse_args(argv=None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Args):
        default = f.default if f.default_factory is MISSING else f.default_factory()
        kw = {"help": f.metadata["help"], "default": default}
        if isinstance(default, bool):
            kw["action"] = "store_true"
        elif isinstance(default, list):
            kw.update(nargs="+", type=float)
        else:
            kw.update(type=type(default), choices=f.metadata["choices"])
        p.add_argument("--" + flag(f.name), **kw)
    return Args(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------
# Data: preference pairs (x, y_w, y_l). y_w ("chosen") is the side +v steers toward.

ALIASES = {  # BiPO / CAA column names -> ours
    "question": "prompt",
    "matching": "chosen", "answer_matching_behavior": "chosen",
    "not_matching": "rejected", "answer_not_matching_behavior": "rejected",
}
REQUIRED = ("prompt", "chosen", "rejected")


def read_rows(path):
    """Yield (line number, dict) from a .jsonl or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} not found: pass --data PATH to a .jsonl or .csv file")
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix == ".csv":
            for i, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                yield i, row
            return
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno}); "
                                 f"fix or delete that line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object with prompt/chosen/rejected")
            yield i, row


def load_pairs(path, behavior, test_fraction=0.2, seed=0):
    """Pairs of one behaviour as (train, test) lists of dicts with prompt, chosen, rejected.

    Rows without a `behavior` field belong to every behaviour (BiPO's files hold one behaviour each).
    Rows without a `split` field are split at random, but always the same way for the same seed.
    """
    pairs, seen = [], set()
    for line, row in read_rows(path):
        row = {ALIASES.get(k, k): v for k, v in row.items()}
        seen.add(row.get("behavior") or behavior)
        if row.get("behavior", behavior) != behavior:
            continue
        for key in REQUIRED:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}:{line}: missing or empty field {key!r} "
                                 f"(each row needs {', '.join(REQUIRED)}; question/matching/not_matching also work)")
        if row.get("split") not in (None, "", "train", "test"):
            raise ValueError(f"{path}:{line}: split is {row['split']!r}; use 'train', 'test' or leave it out")
        pairs.append({k: row[k] for k in REQUIRED} | {"split": row.get("split") or None})
    if not pairs:
        raise ValueError(f"no pairs for behavior {behavior!r} in {path}; "
                         f"behaviors there: {sorted(seen) or 'none (the file is empty)'}")
    unassigned = [p for p in pairs if p["split"] is None]
    random.Random(seed).shuffle(unassigned)
    n_test = round(len(unassigned) * test_fraction)
    for i, p in enumerate(unassigned):
        p["split"] = "test" if i < n_test else "train"
    train = [p for p in pairs if p["split"] == "train"]
    test = [p for p in pairs if p["split"] == "test"]
    if not train:
        raise ValueError(f"{path}: behavior {behavior!r} has {len(pairs)} pairs but none for training; "
                         f"lower --test-fraction or mark some rows split='train'")
    return train, test


def chat_prompt(tok, prompt):
    """The prompt as the chat model sees it: one user turn, then the start of the model's turn.
    Only a user role is used, so templates that reject a system role (Gemma's) work."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)


def tokenize_pair(tok, pair):
    """Token ids of x, y_w and y_l, tokenized separately so the scored ids are exactly the response's
    (tokenizing prompt+response as one string could merge tokens across the boundary)."""
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # the template already has <bos>
    return ids(chat_prompt(tok, pair["prompt"])), ids(pair["chosen"]), ids(pair["rejected"])


def collate(examples, pad_id, device):
    """Chosen and rejected sequences of a batch, stacked for one forward: rows [0, B) are x+y_w,
    rows [B, 2B) are x+y_l. Right-padded, so padding never changes the tokens before it."""
    seqs = [p + w for p, w, _ in examples] + [p + l for p, _, l in examples]
    prompt_lens = [len(p) for p, _, _ in examples] * 2
    T = max(map(len, seqs))
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), T, dtype=torch.long)
    response_mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
        response_mask[i, n:len(s)] = True
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "response_mask": response_mask.to(device), "prompt_lens": torch.tensor(prompt_lens, device=device)}


# ----------------------------------------------------------------------------------------------------
# The steering hook. Eq. 3, with z = Enc(h) >= 0 and an affine decoder Dec(a) = a @ W_dec + b_dec:
#   h' = Dec(ReLU(z + d*lam*v)) + (h - Dec(z))  =  h + (ReLU(z + d*lam*v) - z) @ W_dec
# so one encode and one decode-sized matmul per token, and h' is exactly h when v = 0.

def steer(h, v, coeff, sae=None):
    """Steered residual stream. h: [B, T, d_model]; v: [d_sae] (sparse) or [d_model] (dense, sae=None);
    coeff = d*lam (training) or m*lam (evaluation). v stays float32; the result has h's dtype."""
    if coeff == 0:
        return h
    if sae is None:                                              # BiPO: h' = h + d*lam*v
        return h + (coeff * v).to(h.dtype)
    z = sae.encode(h)                                            # [B, T, d_sae], z >= 0
    z_steered = torch.relu(z + coeff * v)                        # <- YaPO: shift the latents, stay non-negative
                                                                 #    (float32 at least: v's dtype wins over bf16)
    delta = (z_steered - z).to(sae.W_dec.dtype) @ sae.W_dec      # <- Eq. 3 with the residual correction folded in
    return h + delta.to(h.dtype)                                 # [B, T, d_model]


def decoder_layers(model):
    return model.model.layers


@contextmanager
def steering(model, layer, v, coeff, sae=None):
    """Steer every token position at the output of decoder layer `layer` inside the `with` block."""
    def hook(module, inputs, output):
        if isinstance(output, tuple):  # transformers < 5 returns (hidden_states, ...)
            return (steer(output[0], v, coeff, sae),) + output[1:]
        return steer(output, v, coeff, sae)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def restrict_sae(sae, latents):
    """The same SAE with only `latents` kept: W_enc[:, S], b_enc[S], threshold[S], W_dec[S].
    Exact for SAEs whose activation acts on each latent alone (ReLU, JumpReLU, gated): those latents get
    the same z as in the full SAE, and latents where v = 0 contribute ReLU(z) - z = 0 to Eq. 3 anyway."""
    if sae.cfg.architecture() not in ("standard", "jumprelu", "gated"):
        raise ValueError(f"--top-k needs an SAE whose activation acts latent by latent; "
                         f"this one is {sae.cfg.architecture()!r}: evaluate without --top-k")
    cfg = type(sae.cfg).from_dict(sae.cfg.to_dict() | {"d_sae": len(latents)})
    small = type(sae)(cfg)
    state = {name: (p[:, latents] if name == "W_enc" else p[latents] if p.shape[0] == sae.cfg.d_sae else p)
             for name, p in sae.state_dict().items()}
    small.load_state_dict(state)
    return small.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)


def prune(v, sae, k):
    """Keep the k largest |v_i|: returns (v restricted to them, the SAE restricted to them), so the hook
    encodes and decodes k latents instead of d_sae."""
    latents = v.abs().topk(min(k, v.numel())).indices.sort().values
    return v[latents].detach().clone(), restrict_sae(sae, latents)


# ----------------------------------------------------------------------------------------------------
# Log-probs: log p(y|x) = sum over response tokens of log p(y_t | x, y_<t).

def lm_head_logits(model, h):
    """The LM head as the model's forward applies it, on hidden states h [n, d_model] -> [n, V].
    Gemma-2 caps its logits with tanh(logits / c) * c (config.final_logit_softcapping)."""
    logits = model.get_output_embeddings()(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def sequence_logprobs(model, batch):
    """Returns (log p(y|x) per row [N], log p(next token | x) at the end of each prompt [N, V]).

    The LM head runs only on the hidden states that predict a response token, gathered into one
    [n_tokens, d_model] matrix: with Gemma's 256k vocabulary every other row of logits would cost more
    time and memory than the whole rest of the step."""
    ids, mask, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    N = len(ids)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state      # [N, T, d_model]
    predicts = response[:, 1:]                                      # position t predicts token t+1: [N, T-1]
    logits = lm_head_logits(model, hidden[:, :-1][predicts]).float()                # [n_tokens, V]
    token_logp = -F.cross_entropy(logits, ids[:, 1:][predicts], reduction="none")   # [n_tokens]
    seq_logp = torch.zeros(N, device=ids.device).index_add(0, predicts.nonzero()[:, 0], token_logp)
    last_prompt = hidden[torch.arange(N, device=ids.device), batch["prompt_lens"] - 1]   # [N, d_model]
    next_logp = lm_head_logits(model, last_prompt).float().log_softmax(-1)                 # [N, V]
    return seq_logp, next_logp


@torch.no_grad()
def reference_logprobs(model, tokenized, batch_size, pad_id, device):
    """log p_0(y_w|x) and log p_0(y_l|x) of every pair with steering off. Nothing in p_0 trains, so these
    are constants: computed once here instead of by a second forward at every step."""
    ref_w, ref_l = [], []
    for i in range(0, len(tokenized), batch_size):
        chunk = tokenized[i:i + batch_size]
        logp, _ = sequence_logprobs(model, collate(chunk, pad_id, device))
        ref_w.append(logp[:len(chunk)])
        ref_l.append(logp[len(chunk):])
    return torch.cat(ref_w), torch.cat(ref_l)


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


def preference_loss(model, sae, v, batch, ref_w, ref_l, d, args):
    """Eq. 4 for one batch: chosen and rejected in one forward, steered with d*lam*v."""
    with steering(model, args.layer, v, d * args.lam, sae):
        logp, _ = sequence_logprobs(model, batch)                 # [2B]: chosen rows, then rejected rows
    B = len(ref_w)
    return yapo_loss(logp[:B], logp[B:], ref_w, ref_l, d, args.beta)


# ----------------------------------------------------------------------------------------------------
# Training loop (Algorithm 1): only v trains; the LLM and the SAE stay frozen.

def cosine_with_warmup(step, total, warmup_steps):
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(model, tok, sae, pairs, args, save_to=None):
    """Learn v on `pairs`. sae=None trains the dense BiPO vector. Returns (v, history of per-step dicts)."""
    device = model.device
    model.requires_grad_(False).eval()
    if sae is not None:
        sae.requires_grad_(False)
    tokenized = [tokenize_pair(tok, p) for p in pairs]
    n = len(tokenized)
    if args.reference == "unsteered":
        ref_w, ref_l = reference_logprobs(model, tokenized, args.batch_size, tok.pad_token_id, device)
    else:                                                         # --reference none: no reference term
        ref_w = ref_l = torch.zeros(n, device=device)

    size = sae.cfg.d_sae if sae is not None else model.config.hidden_size
    v = torch.zeros(size, device=device, dtype=torch.float32, requires_grad=True)   # v = 0: start unsteered
    opt = torch.optim.AdamW([v], lr=args.lr)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, total, max(1, round(args.warmup * total))))
    gen = torch.Generator().manual_seed(args.seed)                # batch order and directions d

    history, bar = [], tqdm(total=total, desc=f"train {args.mode}")
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, args.batch_size):
            idx = order[start:start + args.batch_size]
            d = 1.0 if torch.randint(2, (1,), generator=gen).item() else -1.0     # <- d ~ U{-1, +1}, once per batch
            batch = collate([tokenized[i] for i in idx], tok.pad_token_id, device)
            loss, margin = preference_loss(model, sae, v, batch, ref_w[idx], ref_l[idx], d, args)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at epoch {epoch}, step {len(history)}: training stopped. "
                    f"Lower --lr or --lam; the last vector saved at the end of an epoch is kept")
            loss.backward()
            torch.nn.utils.clip_grad_norm_([v], args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            history.append({"step": len(history), "epoch": epoch, "d": d, "loss": loss.item(),
                            "accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()})
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{history[-1]['accuracy']:.2f}",
                            margin=f"{history[-1]['margin']:.2f}")
            bar.update()
        if save_to is not None:
            save_vector(save_to, v, args, sae)
    bar.close()
    return v.detach(), history


# ----------------------------------------------------------------------------------------------------
# Saving and loading: safetensors with metadata, checked on load (a vector only means something for the
# model, layer, SAE and mode it was trained with).

def vector_metadata(args, sae, size):
    sparse = sae is not None
    return {
        "format": FORMAT_VERSION, "mode": args.mode, "model": args.model, "layer": str(args.layer),
        "sae": args.sae if sparse else "", "sae_id": args.sae_id if sparse else "",
        "hook_name": sae.cfg.metadata.hook_name if sparse else f"blocks.{args.layer}.hook_resid_post",
        "d_sae": str(sae.cfg.d_sae) if sparse else "", "size": str(size), "args": json.dumps(asdict(args)),
    }


def save_vector(path, v, args, sae):
    """Write atomically: a crash mid-write never leaves a broken file in place of a good one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"v": v.detach().float().cpu().contiguous()}, str(tmp), metadata=vector_metadata(args, sae, v.numel()))
    os.replace(tmp, path)


def load_vector(path, args, sae, device="cpu"):
    """Load v and check its metadata against the model, layer, SAE and mode in use."""
    if not Path(path).is_file():
        raise ValueError(f"vector file {path} not found: pass --vector PATH to a vector.safetensors")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta, v = f.metadata() or {}, f.get_tensor("v")
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a YaPO vector (format {meta.get('format')!r}, expected {FORMAT_VERSION!r})")
    expected = vector_metadata(args, sae, v.numel())
    if sae is not None:
        expected["size"] = str(sae.cfg.d_sae)
    keys = ("mode", "model", "layer", "sae", "sae_id", "hook_name", "d_sae", "size")
    wrong = [f"{k}: saved {meta.get(k)!r}, in use {expected[k]!r}" for k in keys if meta.get(k) != expected[k]]
    if wrong:
        raise ValueError(f"{path} was trained for another setup; " + "; ".join(wrong)
                         + ". Pass the flags it was trained with (see its metadata 'args').")
    return v


# ----------------------------------------------------------------------------------------------------
# Evaluation on held-out pairs, for a sweep of multipliers m (steering with m*lam*v).

@torch.no_grad()
def generate(model, tok, prompt, max_new_tokens):
    ids = tok(chat_prompt(tok, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def evaluate(model, tok, sae, v, pairs, args):
    """Per multiplier m: behaviour score = mean sigmoid(log p(y_w|x) - log p(y_l|x)); accuracy = share of
    pairs with log p(y_w|x) > log p(y_l|x); drift = mean KL(steered || unsteered) of the next-token
    distribution after each prompt. Plus a few greedy answers per m."""
    tokenized = [tokenize_pair(tok, p) for p in pairs]
    batches = [collate(tokenized[i:i + args.batch_size], tok.pad_token_id, model.device)
               for i in range(0, len(tokenized), args.batch_size)]

    def scores():
        out = [sequence_logprobs(model, b) for b in batches]
        halves = [(lp[:len(lp) // 2], lp[len(lp) // 2:], nxt[:len(lp) // 2]) for lp, nxt in out]
        return [torch.cat(x) for x in zip(*halves)]                # logp_w [n], logp_l [n], next_logp [n, V]

    _, _, base_next = scores()
    rows, generations = [], {}
    for m in args.multipliers:
        with steering(model, args.layer, v, m * args.lam, sae):
            logp_w, logp_l, next_logp = scores()
            generations[str(m)] = [generate(model, tok, p["prompt"], args.max_new_tokens)
                                   for p in pairs[:args.n_generations]]
        drift = F.kl_div(base_next, next_logp, log_target=True, reduction="none").sum(-1)  # KL(steered || base)
        rows.append({"multiplier": m,
                     "behavior_score": torch.sigmoid(logp_w - logp_l).mean().item(),
                     "accuracy": (logp_w > logp_l).float().mean().item(),
                     "drift_kl": drift.mean().item()})
    return {"rows": rows, "generations": generations,
            "prompts": [p["prompt"] for p in pairs[:args.n_generations]]}


def print_table(rows):
    print(f"{'multiplier':>10} {'behavior':>9} {'accuracy':>9} {'drift KL':>9}")
    for r in rows:
        print(f"{r['multiplier']:>10.2f} {r['behavior_score']:>9.3f} {r['accuracy']:>9.3f} {r['drift_kl']:>9.4f}")


def neuronpedia_url(sae, latent):
    """Where to read what a latent means, if the SAE's metadata names its Neuronpedia page."""
    np_id = sae.cfg.metadata.neuronpedia_id
    return f"https://www.neuronpedia.org/{np_id}/{latent}" if np_id else None


def top_latents(v, sae, n):
    """The n most positive and n most negative latents of a sparse v, with Neuronpedia links if the SAE
    has a Neuronpedia id. Also the vector's L0 (latents it touches at all) and L2 norm."""
    pick = lambda vals: [{"latent": int(i), "value": float(v[i]), "url": neuronpedia_url(sae, int(i))}
                         for i in vals if v[i] != 0]
    k = min(n, v.numel())
    return {"l0": int((v != 0).sum()), "norm": float(v.norm()),
            "positive": pick(v.topk(k).indices), "negative": pick((-v).topk(k).indices)}


# ----------------------------------------------------------------------------------------------------
# Models and SAEs: the real ones from the hub or local folders, or --tiny ones built here.

TINY_LAYER = 2


def pick_device_dtype(device):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU: use --device cpu (or --tiny)")
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    return torch.device(device), (torch.bfloat16 if bf16 else torch.float32)


def looks_local(name):
    return Path(name).exists() or name.startswith(("/", ".", "~"))


def load_model(name, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="eager")
    except Exception as e:
        cause = str(e).strip().split("\n")[0][:300]
        likely = (f"the folder {name} does not exist or lacks config.json and tokenizer files "
                  f"(write them with model.save_pretrained and tokenizer.save_pretrained)" if looks_local(name) else
                  f"no network; a typo in the id; or a gated model (Gemma is): accept its license on "
                  f"https://huggingface.co/{name} and log in (`hf auth login`, or set HF_TOKEN)")
        raise ValueError(f"could not load model {name!r}: {type(e).__name__}: {cause}\nLikely cause: {likely}.\n"
                         f"To see the whole pipeline offline instead, run with --tiny.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def load_sae(name, sae_id, device, dtype):
    try:
        if Path(name).is_dir():
            return SAE.load_from_disk(name, device=str(device), dtype=str(dtype).removeprefix("torch."))
        return SAE.from_pretrained(name, sae_id, device=str(device), dtype=str(dtype).removeprefix("torch."))
    except Exception as e:
        cause = str(e).strip().split("\n")[0][:300]
        raise ValueError(
            f"could not load SAE {name!r} / {sae_id!r}: {type(e).__name__}: {cause}\n"
            f"--sae takes a sae-lens release (e.g. gemma-scope-2b-pt-res) with --sae-id, or a folder written by "
            f"sae.save_model. Without network, run with --tiny.") from None


def check_pair(model, sae, layer):
    """The SAE must read the same residual stream that the hook steers."""
    d_model, n_layers = model.config.hidden_size, len(decoder_layers(model))
    if not 0 <= layer < n_layers:
        raise ValueError(f"--layer {layer}, but the model has layers 0..{n_layers - 1}")
    ids = torch.tensor([[model.config.bos_token_id or 0] * 2], device=model.device)
    with torch.no_grad():                          # sequence_logprobs applies the LM head itself
        full = model(input_ids=ids).logits[0, -1].float()
        ours = lm_head_logits(model, model.model(input_ids=ids).last_hidden_state[0, -1]).float()
    if not torch.allclose(full, ours, rtol=0.02, atol=0.02 * full.abs().max().item()):   # bf16-sized slack
        raise ValueError(f"{type(model).__name__} transforms its logits in a way lm_head_logits does not repeat; "
                         f"add that step to lm_head_logits")
    if sae is None:
        return
    if sae.cfg.d_in != d_model:
        raise ValueError(f"SAE d_in is {sae.cfg.d_in} but the model's hidden size is {d_model}: "
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


def tiny_tokenizer(texts):
    """A byte-level BPE tokenizer trained on `texts`, with a Gemma-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>",
                                  additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' "
        "+ m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
    return tok


def residual_stream(model, layer, input_ids):
    """h at the output of decoder layer `layer`: [B, T, d_model]."""
    captured = {}
    def hook(module, inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        handle.remove()
    return captured["h"]


def calibrate_thresholds(sae, h, l0):
    """Set a JumpReLU SAE's thresholds so that about `l0` latents fire per token of h [N, d_in]."""
    with torch.no_grad():
        pre = sae.process_sae_in(h) @ sae.W_enc + sae.b_enc             # [N, d_sae]
        sae.threshold.data = pre.float().quantile(1 - l0 / sae.cfg.d_sae, dim=0).clamp(min=0).to(sae.dtype)


def random_sae(d_in, d_sae, layer, seed, decoder_norm=1.0, model_name="tiny-gemma2"):
    """A random JumpReLU SAE: decoder rows of length `decoder_norm`, encoder = their unit directions
    transposed, thresholds 0 (see calibrate_thresholds)."""
    g = torch.Generator().manual_seed(seed)
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(
        hook_name=f"blocks.{layer}.hook_resid_post", model_name=model_name))
    sae = JumpReLUSAE(cfg)
    directions = torch.randn(d_sae, d_in, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    sae.load_state_dict({"W_dec": directions * decoder_norm, "W_enc": directions.T.contiguous(),
                         "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in), "threshold": torch.zeros(d_sae)})
    return sae


def tiny_setup(texts, seed=0, layer=TINY_LAYER, d_sae=512, l0=32):
    """Random tiny Gemma-2 (4 layers, d_model 64), its tokenizer and a random SAE at `layer`.
    Random weights: numbers from it show the mechanics, never real behaviour."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    tok = tiny_tokenizer(texts)
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                          sliding_window=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    sample = tok(texts[:64], add_special_tokens=False, padding=True, return_tensors="pt")
    h = residual_stream(model, layer, sample["input_ids"])[sample["attention_mask"].bool()]   # [N, 64]
    # A random model barely reacts to small nudges; decoder rows as long as the residual stream itself
    # let the paper's learning rate move the loss visibly within 20 epochs.
    sae = random_sae(64, d_sae, layer, seed, decoder_norm=h.norm(dim=-1).median().item())
    calibrate_thresholds(sae, h, l0)
    return model, tok, sae


# ----------------------------------------------------------------------------------------------------
# main: data -> model and SAE -> train (or load) -> evaluate -> interpret -> results.json

def new_run_dir(args):
    stem = f"{args.behavior}_{args.mode}_{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(1000):
        path = Path(args.out_dir) / (stem if i == 0 else f"{stem}-{i}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise ValueError(f"could not make a new run folder in {args.out_dir}")


def setup(args, pairs):
    """Model, tokenizer and SAE (None in dense mode) for args, checked against each other."""
    device, dtype = pick_device_dtype(args.device)
    if args.tiny:
        args.layer = TINY_LAYER
        texts = [t for p in pairs for t in (p["prompt"], p["chosen"], p["rejected"])]
        model, tok, sae = tiny_setup(texts, args.seed)
        model, sae = model.to(device), sae.to(device)
        args.model, args.sae, args.sae_id = "tiny-random-gemma2", "tiny-random-jumprelu", f"seed{args.seed}"
    else:
        model, tok = load_model(args.model, device, dtype)
        sae = load_sae(args.sae, args.sae_id, device, dtype) if args.mode == "sparse" else None
    if args.mode == "dense":
        sae = None
    check_pair(model, sae, args.layer)
    return model, tok, sae


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)  # matrices this small gain nothing from threads, and lose a lot on a busy CPU
    train_pairs, test_pairs = load_pairs(args.data, args.behavior, args.test_fraction, args.seed)
    if args.eval_only and not args.vector:
        raise ValueError("--eval-only needs --vector PATH")
    if args.top_k and args.mode != "sparse":
        raise ValueError("--top-k prunes SAE latents, so it needs --mode sparse")
    model, tok, sae = setup(args, train_pairs + test_pairs)
    if args.tiny:
        print("NOTE: --tiny uses a RANDOM model, tokenizer and SAE: the numbers show the mechanics, "
              "not real behaviour.")
    loaded = load_vector(args.vector, args, sae, model.device) if args.eval_only else None  # fail before writing
    run = new_run_dir(args)
    print(f"{args.behavior}: {len(train_pairs)} train / {len(test_pairs)} test pairs; mode {args.mode}; "
          f"layer {args.layer}; writing to {run}")

    if loaded is not None:
        v, history = loaded, []
    else:
        v, history = train(model, tok, sae, train_pairs, args, save_to=run / "vector.safetensors")
    eval_v, eval_sae = v, sae
    if args.top_k:
        eval_v, eval_sae = prune(v, sae, args.top_k)
        print(f"evaluating the vector pruned to its top {args.top_k} latents")

    results = {"args": asdict(args), "train": history, "test_pairs": len(test_pairs)}
    if test_pairs:
        results["eval"] = evaluate(model, tok, eval_sae, eval_v, test_pairs, args)
        print_table(results["eval"]["rows"])
        for m, answers in results["eval"]["generations"].items():
            print(f"\n--- multiplier {m} ---")
            for prompt, answer in zip(results["eval"]["prompts"], answers):
                print(f"Q: {prompt[:80]!r}\nA: {answer[:200]!r}")
    else:
        print("no held-out pairs: evaluation skipped")
    if sae is not None:
        results["latents"] = top_latents(v, sae, args.n_top_latents)
        print(f"\nv: L0 {results['latents']['l0']} of {v.numel()} latents, norm {results['latents']['norm']:.3f}")
        for sign in ("positive", "negative"):
            for t in results["latents"][sign]:
                print(f"  latent {t['latent']:>6} {t['value']:+.4f} {t['url'] or ''}")
    with open(run / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {run / 'results.json'}" + ("" if args.eval_only else f" and {run / 'vector.safetensors'}"))
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
