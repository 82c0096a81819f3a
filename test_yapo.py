"""The specification of yapo.py, offline: a tiny random Gemma-2, a tokenizer trained here and a random
JumpReLU SAE stand in for Gemma-2-2B and Gemma Scope. Run: python -m pytest -q test_yapo.py"""

import copy
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach for a hub, and failing lookups must fail fast

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import yapo

ROOT = Path(__file__).parent
DATA = ROOT / "data_sample.jsonl"
LAYER = yapo.TINY_LAYER


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def pairs():
    return yapo.load_pairs(DATA, "power_seeking", test_fraction=0.2, seed=0)


@pytest.fixture(scope="session")
def tiny(pairs):
    train, test = pairs
    texts = [t for p in train + test for t in (p["prompt"], p["chosen"], p["rejected"])]
    return yapo.tiny_setup(texts, seed=0)


@pytest.fixture
def args(tmp_path):
    return yapo.Args(tiny=True, layer=LAYER, model="tiny-random-gemma2", sae="tiny-random-jumprelu",
                     sae_id="seed0", out_dir=str(tmp_path), n_generations=1, max_new_tokens=4)


def hidden(seed=0, shape=(2, 5, 64), scale=20.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def random_v(n, seed=1):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(behavior="b", i=0, **extra):
    return {"behavior": behavior, "prompt": f"question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} | extra


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


def test_sparse_steer_changes_h(tiny):
    _, _, sae = tiny
    h = hidden()
    assert (yapo.steer(h, random_v(sae.cfg.d_sae), 1.0, sae) - h).abs().max() > 1e-2


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
    sae16 = yapo.restrict_sae(sae, torch.arange(sae.cfg.d_sae)).to(torch.bfloat16)
    h = hidden().to(torch.bfloat16)
    for v, s in ((torch.zeros(sae.cfg.d_sae, requires_grad=True), sae16), (torch.zeros(64, requires_grad=True), None)):
        out = yapo.steer(h, v, 1.0, s)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
        assert v.grad is not None and v.grad.dtype == torch.float32 and v.grad.abs().sum() > 0


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
    with yapo.steering(model, LAYER, random_v(sae.cfg.d_sae), 1.0, sae):
        steered = model(input_ids=ids).logits
    after = model(input_ids=ids).logits
    assert not torch.allclose(before, steered, atol=1e-3)
    assert torch.equal(before, after)


def test_generation_with_kv_cache_matches_generation_without_it_under_steering(tiny, pairs):
    model, tok, sae = tiny
    prompt = torch.tensor([yapo.tokenize_pair(tok, pairs[1][0])[0]])
    outs = []
    with yapo.steering(model, LAYER, random_v(sae.cfg.d_sae) * 3, 1.0, sae):
        for use_cache in (True, False):
            outs.append(model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                       do_sample=False, use_cache=use_cache, pad_token_id=tok.pad_token_id))
    unsteered = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                               do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], unsteered)  # the steering did act on the generation


# ---------------------------------------------------------------------------------------------- pruning (top-K)

def test_pruned_vector_on_its_support_matches_the_full_computation(tiny):
    _, _, sae = tiny
    v, h, k = random_v(sae.cfg.d_sae), hidden(), 16
    v_small, sae_small = yapo.prune(v, sae, k)
    keep = v.abs().topk(k).indices
    v_pruned = torch.zeros_like(v)
    v_pruned[keep] = v[keep]
    assert sae_small.cfg.d_sae == k and sae_small.W_dec.shape == (k, 64)
    torch.testing.assert_close(yapo.steer(h, v_small, 1.5, sae_small), yapo.steer(h, v_pruned, 1.5, sae), atol=1e-4, rtol=1e-5)


def test_restricted_sae_gives_the_same_latents_as_the_full_one(tiny):
    _, _, sae = tiny
    latents = torch.tensor([3, 17, 200, 511])
    h = hidden()
    torch.testing.assert_close(yapo.restrict_sae(sae, latents).encode(h), sae.encode(h)[..., latents])


# ---------------------------------------------------------------------------------------------- data

def test_sample_data_has_every_behavior_with_at_least_40_pairs():
    counts = {}
    for _, r in yapo.read_rows(DATA):
        counts[r["behavior"]] = counts.get(r["behavior"], 0) + 1
    assert set(counts) >= {"power_seeking", "wealth_seeking", "hallucination", "jailbreak", "culture_morocco"}
    assert min(counts.values()) >= 40


def test_split_is_deterministic_disjoint_and_sized_by_test_fraction():
    train, test = yapo.load_pairs(DATA, "hallucination", test_fraction=0.25, seed=3)
    again = yapo.load_pairs(DATA, "hallucination", test_fraction=0.25, seed=3)
    other = yapo.load_pairs(DATA, "hallucination", test_fraction=0.25, seed=4)
    assert (train, test) == again
    assert [p["prompt"] for p in test] != [p["prompt"] for p in other[1]]
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert len(test) == round(0.25 * (len(train) + len(test)))


def test_split_field_is_respected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row(i=i, split="test" if i < 2 else "train") for i in range(6)])
    train, test = yapo.load_pairs(path, "b", test_fraction=0.5)
    assert [p["prompt"] for p in test] == ["question 0?", "question 1?"] and len(train) == 4


def test_bipo_column_names_and_csv_are_accepted(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,matching,not_matching\nQ1?,(A) yes,(B) no\nQ2?,(B) sure,(A) nope\n")
    train, test = yapo.load_pairs(path, "anything", test_fraction=0.0)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in train] == [("Q1?", "(A) yes", "(B) no"),
                                                                            ("Q2?", "(B) sure", "(A) nope")]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        yapo.load_pairs(path, "b")


def test_missing_field_names_file_line_and_field(tmp_path):
    bad = row(i=1)
    del bad["rejected"]
    path = write_jsonl(tmp_path / "d.jsonl", [row(), bad])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing or empty field 'rejected'"):
        yapo.load_pairs(path, "b")


def test_unknown_behavior_lists_the_behaviors_in_the_file():
    with pytest.raises(ValueError, match=r"no pairs for behavior 'power_seekin'.*'culture_morocco'.*'power_seeking'"):
        yapo.load_pairs(DATA, "power_seekin")


def test_selection_without_training_pairs_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row(i=i, split="test") for i in range(3)])
    with pytest.raises(ValueError, match="none for training"):
        yapo.load_pairs(path, "b")


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found: pass --data"):
        yapo.load_pairs(tmp_path / "nope.jsonl", "b")


# ---------------------------------------------------------------------------------------------- tokens and log-probs

def test_chat_prompt_uses_only_a_user_turn_so_system_rejecting_templates_work(tiny):
    _, tok, _ = tiny
    with pytest.raises(Exception, match="System role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], tokenize=False)
    assert yapo.chat_prompt(tok, "Hi?") == "<bos><start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\n"


def test_scored_tokens_are_exactly_the_response(tiny, pairs):
    _, tok, _ = tiny
    pair = pairs[0][0]
    prompt_ids, chosen_ids, rejected_ids = yapo.tokenize_pair(tok, pair)
    batch = yapo.collate([(prompt_ids, chosen_ids, rejected_ids)], tok.pad_token_id, "cpu")
    assert tok.decode(batch["input_ids"][0][batch["response_mask"][0]]) == pair["chosen"]
    assert tok.decode(batch["input_ids"][1][batch["response_mask"][1]]) == pair["rejected"]


def test_collate_masks_prompt_and_padding_on_hand_built_ids():
    batch = yapo.collate([([1, 2, 3], [4, 5], [6]), ([7], [8, 9, 10], [11, 12])], pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    assert batch["response_mask"].int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]


def test_sequence_logprobs_match_a_full_log_softmax_computed_row_by_row(tiny):
    model, _, _ = tiny
    examples = [([2, 4, 30, 31], [40, 41, 42], [50]), ([2, 4, 33], [60], [70, 71, 72, 73])]
    batch = yapo.collate(examples, pad_id=0, device="cpu")
    with torch.no_grad():
        seq_logp, next_logp = yapo.sequence_logprobs(model, batch)
        for i, (prompt, response) in enumerate([(p, w) for p, w, _ in examples] + [(p, l) for p, _, l in examples]):
            ids = torch.tensor([prompt + response])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)          # every position, unpadded
            expected = sum(logp[len(prompt) - 1 + t, tok_id] for t, tok_id in enumerate(response))
            torch.testing.assert_close(seq_logp[i], expected, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(next_logp[i], logp[len(prompt) - 1], atol=1e-4, rtol=1e-5)


def test_lm_head_runs_only_on_positions_that_predict_response_tokens(tiny):
    model, _, _ = tiny
    rows = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape))
    batch = yapo.collate([([1] * 20, [5, 6, 7], [8])], pad_id=0, device="cpu")
    try:
        with torch.no_grad():
            yapo.sequence_logprobs(model, batch)
    finally:
        handle.remove()
    assert rows[0] == (3 + 1, 64)  # the chosen's 3 and the rejected's 1 response tokens, not all 23 positions
    assert rows[1] == (2, 64)      # then the last prompt position of each row, for the next-token distribution


# ---------------------------------------------------------------------------------------------- the loss (Eq. 4)

def test_loss_matches_a_hand_computed_value():
    logp_w, logp_l = torch.tensor([-3.0, -7.0]), torch.tensor([-5.0, -6.0])
    ref_w, ref_l = torch.tensor([-4.0, -7.5]), torch.tensor([-4.5, -6.5])
    loss, margin = yapo.yapo_loss(logp_w, logp_l, ref_w, ref_l, d=1.0, beta=0.1)
    # pair 1: (−3+4) − (−5+4.5) = 1.5; pair 2: (−7+7.5) − (−6+6.5) = 0.0
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


# ---------------------------------------------------------------------------------------------- training

@pytest.fixture(scope="session")
def trained(tiny, pairs, tmp_path_factory):
    """One short sparse training run, shared by the tests that inspect its result."""
    model, tok, sae = tiny
    before = {k: t.clone() for k, t in list(model.state_dict().items()) + [("sae." + k, t) for k, t in sae.state_dict().items()]}
    args = yapo.Args(tiny=True, layer=LAYER, model="tiny-random-gemma2", sae="tiny-random-jumprelu", sae_id="seed0",
                     lr=5e-3, epochs=4, multipliers=[-1.0, 0.0, 1.0], n_generations=1, max_new_tokens=4)
    path = tmp_path_factory.mktemp("run") / "vector.safetensors"
    v, history = yapo.train(model, tok, sae, pairs[0], args, save_to=path)
    return {"v": v, "history": history, "args": args, "path": path, "before": before}


def test_training_leaves_every_model_and_sae_weight_unchanged(tiny, trained):
    model, _, sae = tiny
    after = dict(list(model.state_dict().items()) + [("sae." + k, t) for k, t in sae.state_dict().items()])
    assert all(torch.equal(trained["before"][k], after[k]) for k in after)
    assert all(p.grad is None for p in list(model.parameters()) + list(sae.parameters()))


def test_only_v_receives_gradients(tiny, pairs, args):
    model, tok, sae = tiny
    model.requires_grad_(False), sae.requires_grad_(False)
    v = torch.zeros(sae.cfg.d_sae, requires_grad=True)
    batch = yapo.collate([yapo.tokenize_pair(tok, p) for p in pairs[0][:2]], tok.pad_token_id, "cpu")
    with yapo.steering(model, LAYER, v, 1.0, sae):
        logp, _ = yapo.sequence_logprobs(model, batch)
    loss, _ = yapo.yapo_loss(logp[:2], logp[2:], torch.zeros(2), torch.zeros(2), 1.0, 0.1)
    loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(model.parameters()) + list(sae.parameters()))


def test_trained_vector_is_float32_and_nonzero(trained, tiny):
    v = trained["v"]
    assert v.dtype == torch.float32 and v.shape == (tiny[2].cfg.d_sae,) and v.abs().sum() > 0


def test_training_lowers_the_loss(trained):
    losses = [h["loss"] for h in trained["history"]]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # v = 0: the steered model is the reference
    assert sum(losses[-5:]) / 5 < math.log(2) - 0.01


def test_training_raises_behavior_at_plus_one_and_lowers_it_at_minus_one(tiny, pairs, trained):
    model, tok, sae = tiny
    result = yapo.evaluate(model, tok, sae, trained["v"], pairs[1], trained["args"])
    score = {r["multiplier"]: r["behavior_score"] for r in result["rows"]}
    assert score[-1.0] < score[0.0] < score[1.0]


def test_same_seed_gives_the_identical_vector_and_another_seed_does_not(tiny, pairs, trained):
    model, tok, sae = tiny
    again, _ = yapo.train(model, tok, sae, pairs[0], trained["args"])
    other, _ = yapo.train(model, tok, sae, pairs[0], replace(trained["args"], seed=1))
    assert torch.equal(again, trained["v"])
    assert not torch.equal(other, trained["v"])


def test_directions_are_drawn_once_per_batch_from_both_signs(trained):
    ds = [h["d"] for h in trained["history"]]
    assert set(ds) == {-1.0, 1.0}
    assert len(ds) == 4 * math.ceil(37 / 4)


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
    batch = yapo.collate([yapo.tokenize_pair(tok, p) for p in pairs[0][:4]], tok.pad_token_id, "cpu")
    with torch.no_grad():
        logp, _ = yapo.sequence_logprobs(model, batch)           # v = 0 at the first step
    d = history[0]["d"]
    expected = -F.logsigmoid(0.1 * d * (logp[:4] - logp[4:])).mean()
    assert history[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    lrs = [yapo.cosine_with_warmup(s, 100, 10) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.5) and lrs[100] == pytest.approx(0.0, abs=1e-12)


def test_non_finite_loss_stops_training_with_a_clear_error(tiny, pairs, args):
    model, tok, sae = tiny
    with pytest.raises(FloatingPointError, match=r"loss is nan.*Lower --lr or --lam"):
        yapo.train(model, tok, sae, pairs[0][:4], replace(args, epochs=1, lam=float("inf")))


def test_dense_mode_trains_a_d_model_vector(tiny, pairs, args):
    model, tok, _ = tiny
    v, history = yapo.train(model, tok, None, pairs[0][:8], replace(args, mode="dense", epochs=2, lr=1e-2))
    assert v.shape == (64,) and v.dtype == torch.float32 and v.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- saving and loading

def test_vector_file_round_trips_with_its_metadata(tiny, trained):
    _, _, sae = tiny
    v = yapo.load_vector(trained["path"], trained["args"], sae)
    assert torch.equal(v, trained["v"])
    with safe_open(str(trained["path"]), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == yapo.FORMAT_VERSION and meta["mode"] == "sparse" and meta["layer"] == str(LAYER)
    assert meta["hook_name"] == f"blocks.{LAYER}.hook_resid_post" and meta["d_sae"] == meta["size"] == str(sae.cfg.d_sae)
    assert meta["sae"] == "tiny-random-jumprelu" and meta["sae_id"] == "seed0"
    assert json.loads(meta["args"])["lr"] == trained["args"].lr
    assert not list(trained["path"].parent.glob("*.tmp"))


def test_loading_a_vector_for_another_setup_names_each_mismatch(tiny, trained):
    _, _, sae = tiny
    with pytest.raises(ValueError, match=r"layer: saved '2', in use '1'.*sae_id: saved 'seed0', in use 'other'"):
        yapo.load_vector(trained["path"], replace(trained["args"], layer=1, sae_id="other"), sae)
    with pytest.raises(ValueError, match=r"mode: saved 'sparse', in use 'dense'"):
        yapo.load_vector(trained["path"], replace(trained["args"], mode="dense"), None)


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
        yapo.load_vector(path, trained["args"], tiny[2])


# ---------------------------------------------------------------------------------------------- evaluation

def test_evaluation_scores_match_an_independent_computation(tiny, pairs, trained):
    model, tok, sae = tiny
    test = pairs[1][:3]
    result = yapo.evaluate(model, tok, sae, trained["v"], test, replace(trained["args"], multipliers=[0.0, 2.0]))
    for m, row in zip([0.0, 2.0], result["rows"]):
        sig, wins, kls = [], [], []
        for p in test:
            prompt, chosen, rejected = yapo.tokenize_pair(tok, p)
            with torch.no_grad():
                base = model(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
                with yapo.steering(model, LAYER, trained["v"], m, sae):
                    lp = {}
                    for name, resp in (("w", chosen), ("l", rejected)):
                        logits = model(input_ids=torch.tensor([prompt + resp])).logits[0].log_softmax(-1)
                        lp[name] = sum(logits[len(prompt) - 1 + t, i] for t, i in enumerate(resp))
                    steered = logits[len(prompt) - 1]
            sig.append(torch.sigmoid(lp["w"] - lp["l"]).item())
            wins.append(float(lp["w"] > lp["l"]))
            kls.append((steered.exp() * (steered - base)).sum().item())
        assert row["behavior_score"] == pytest.approx(sum(sig) / 3, abs=1e-4)
        assert row["accuracy"] == pytest.approx(sum(wins) / 3)
        assert row["drift_kl"] == pytest.approx(sum(kls) / 3, abs=1e-5)
    assert result["rows"][0]["drift_kl"] == pytest.approx(0.0, abs=1e-7)
    assert result["rows"][1]["drift_kl"] > 1e-4


def test_evaluation_generates_greedy_answers_per_multiplier(tiny, pairs, trained):
    model, tok, sae = tiny
    result = yapo.evaluate(model, tok, sae, trained["v"], pairs[1][:2], replace(trained["args"], n_generations=2))
    assert set(result["generations"]) == {"-1.0", "0.0", "1.0"}
    assert all(len(g) == 2 and all(isinstance(a, str) for a in g) for g in result["generations"].values())
    assert result["generations"]["0.0"][0] == yapo.generate(model, tok, pairs[1][0]["prompt"], 4)


def test_top_latents_are_sorted_with_neuronpedia_links_l0_and_norm(tiny):
    _, _, sae = tiny
    v = torch.zeros(sae.cfg.d_sae)
    v[[5, 9, 40]] = torch.tensor([0.5, -2.0, 1.0])
    sae.cfg.metadata.neuronpedia_id = "gemma-2-2b/15-gemmascope-res-65k"
    try:
        top = yapo.top_latents(v, sae, 2)
    finally:
        sae.cfg.metadata.neuronpedia_id = None
    assert top["l0"] == 3 and top["norm"] == pytest.approx(math.sqrt(0.25 + 4 + 1))
    assert [t["latent"] for t in top["positive"]] == [40, 5] and [t["latent"] for t in top["negative"]] == [9]
    assert top["positive"][0]["url"] == "https://www.neuronpedia.org/gemma-2-2b/15-gemmascope-res-65k/40"
    assert yapo.top_latents(v, sae, 1)["positive"][0]["url"] is None


# ---------------------------------------------------------------------------------------------- models and SAEs

def test_sae_for_another_layer_is_refused_naming_both_layers(tiny):
    model, _, sae = tiny
    with pytest.raises(ValueError, match=r"--layer 1, but the SAE was trained on layer 2.*pass --layer 2"):
        yapo.check_pair(model, sae, 1)


def test_sae_for_another_width_is_refused_naming_both_sizes(tiny):
    model, _, _ = tiny
    wide = yapo.random_sae(128, 32, LAYER, seed=0)
    with pytest.raises(ValueError, match="SAE d_in is 128 but the model's hidden size is 64"):
        yapo.check_pair(model, wide, LAYER)


def test_a_model_whose_head_does_more_than_softcapping_is_refused(tiny, monkeypatch):
    model, _, _ = tiny
    forward = model.forward

    def scaled_logits(*a, **kw):  # like a model with a logit scale after its LM head
        out = forward(*a, **kw)
        out.logits = out.logits * 0.0625
        return out

    yapo.check_pair(model, None, LAYER)
    monkeypatch.setattr(model, "forward", scaled_logits)
    with pytest.raises(ValueError, match="transforms its logits"):
        yapo.check_pair(model, None, LAYER)


def test_layer_outside_the_model_is_refused(tiny):
    with pytest.raises(ValueError, match=r"--layer 15, but the model has layers 0..3"):
        yapo.check_pair(tiny[0], None, 15)


def test_model_that_cannot_be_loaded_gives_one_message_with_the_tiny_alternative(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"(?s)could not load model 'nobody/no-such-model'.*gated model.*--tiny"):
        yapo.load_model("nobody/no-such-model", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"(?s)could not load model .*the folder .* does not exist.*--tiny"):
        yapo.load_model(str(tmp_path / "no-such-model"), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"(?s)could not load SAE .*--tiny"):
        yapo.load_sae(str(tmp_path / "nope"), "x", torch.device("cpu"), torch.float32)


def test_wrong_choice_names_the_valid_choices():
    with pytest.raises(ValueError, match=r"--mode 'sprase' is not one of \['sparse', 'dense'\]"):
        yapo.Args(mode="sprase")
    with pytest.raises(SystemExit):
        yapo.parse_args(["--reference", "policy"])


def test_help_documents_every_args_field(capsys):
    with pytest.raises(SystemExit):
        yapo.parse_args(["--help"])
    text = capsys.readouterr().out
    for f in fields(yapo.Args):
        assert "--" + f.name.replace("_", "-") in text and f.metadata["help"][:20] in " ".join(text.split())


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
    model, _, sae = tiny
    loaded, _ = yapo.load_model(str(saved_tiny / "model"), torch.device("cpu"), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    results = yapo.main(["--model", str(saved_tiny / "model"), "--sae", str(saved_tiny / "sae"), "--layer", str(LAYER),
                         "--epochs", "1", "--multipliers", "0", "1", "--n-generations", "1", "--max-new-tokens", "3",
                         "--out-dir", str(tmp_path), "--device", "cpu"])
    (run,) = tmp_path.iterdir()
    assert json.loads((run / "results.json").read_text())["eval"]["rows"] == results["eval"]["rows"]
    meta_args = json.loads(safe_open(str(run / "vector.safetensors"), "pt").metadata()["args"])
    assert meta_args["sae"] == str(saved_tiny / "sae")
    assert results["latents"]["l0"] > 0


def run_cli(*argv, cwd):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(ROOT / "yapo.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_tiny_end_to_end_then_eval_only_and_top_k(tmp_path):
    common = ["--tiny", "--data", str(DATA), "--out-dir", str(tmp_path), "--n-generations", "1", "--max-new-tokens", "4"]
    first = run_cli("--behavior", "wealth_seeking", "--epochs", "2", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "RANDOM model" in first.stdout and "multiplier" in first.stdout
    (run,) = tmp_path.iterdir()
    results = json.loads((run / "results.json").read_text())
    assert [r["multiplier"] for r in results["eval"]["rows"]] == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert len(results["train"]) == 2 * math.ceil(37 / 4) and results["args"]["behavior"] == "wealth_seeking"

    second = run_cli("--behavior", "wealth_seeking", "--eval-only", "--vector", str(run / "vector.safetensors"),
                     "--top-k", "8", "--multipliers", "0", "1", *common, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "top 8 latents" in second.stdout
    runs = sorted(tmp_path.iterdir())
    assert len(runs) == 2 and (run / "vector.safetensors").is_file()  # a new folder; the first run is untouched

    bad = run_cli("--behavior", "wealth_seeking", "--eval-only", "--vector", str(run / "vector.safetensors"),
                  "--mode", "dense", *common, cwd=tmp_path)
    assert bad.returncode != 0 and "error:" in bad.stderr and "mode: saved 'sparse', in use 'dense'" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert sorted(tmp_path.iterdir()) == runs  # the refused run wrote nothing


def test_cli_bad_data_fails_before_loading_anything_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row(behavior="power_seeking")) + "\n" + '{"behavior": "power_seeking", "prompt": "x"}\n')
    result = run_cli("--tiny", "--data", str(path), "--out-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode != 0 and f"{path}:2: missing or empty field 'chosen'" in result.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- the notebook

NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def notebook_text(nb):
    """All stdout and HTML the executed notebook produced, as one string."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stdout":
                parts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                parts.append(out.get("data", {}).get("text/html", ""))
    return "\n".join(parts)


def test_tutorial_notebook_runs_offline_end_to_end(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    raw = (ROOT / "tutorial.ipynb").read_text(encoding="utf-8")
    nb = nbformat.reads(raw, as_version=4)
    nbformat.validate(nb)

    # committed clean: no outputs, no execution counts, no machine-specific paths
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells and all(not c.outputs and c.execution_count is None for c in code_cells)
    assert str(ROOT) not in raw
    assert not re.search(r"(?<![\w.])/(?:home|Users|work|tmp|root|mnt)/|[A-Za-z]:\\\\", raw)

    env = dict(os.environ, YAPO_TINY="1", HF_HUB_OFFLINE="1")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute(env=env)        # raises CellExecutionError at the first failing cell
    finally:
        nbformat.write(nb, tmp_path / "tutorial.executed.ipynb")   # for a look after a failure
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    text = notebook_text(nb)

    assert "YAPO_TINY=1 -> random model" in text
    # Eq. 3: the one-decode form equals Eq. 3 as written, v = 0 is exact, the hook matches yapo.steer
    diff, scale = map(float, re.search(rf"one-decode vs two-decode form: max \|diff\| = {NUMBER}  "
                                       rf"\(max \|h\| = {NUMBER}\)", text).groups())
    assert diff <= 1e-4 * scale
    assert "torch.equal(yapo.steer(h, 0, d*lam, sae), h) = True" in text
    assert float(re.search(rf"hook inside the model vs yapo.steer: max \|diff\| = {NUMBER}", text)[1]) <= 1e-6
    # Eq. 4: by hand == yapo_loss == preference_loss for both directions, and the random v changed the loss
    losses = re.findall(rf"d = ([+-]1): by hand {NUMBER} \| yapo_loss {NUMBER} \| preference_loss {NUMBER}", text)
    assert sorted(d for d, *_ in losses) == ["+1", "-1"]
    for _, by_hand, lib, full in losses:
        assert float(lib) == pytest.approx(float(by_hand), abs=1e-5)
        assert float(full) == pytest.approx(float(by_hand), abs=1e-5)
        assert abs(float(by_hand) - math.log(2)) > 1e-4
    # training lowered the loss; the evaluated behaviour score rises with the multiplier
    first, last = map(float, re.search(rf"mean loss in the first epoch {NUMBER}, in the last {NUMBER}", text).groups())
    assert last < first
    table = next(o.text for c in nb.cells for o in c.get("outputs", [])
                 if o.output_type == "stream" and "multiplier  behavior  accuracy  drift KL" in o.text)
    rows = [list(map(float, r)) for r in re.findall(rf"^\s*{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", table, re.M)]
    assert len(rows) >= 3 and rows[-1][1] > rows[0][1]
    assert next(r for r in rows if r[0] == 0.0)[3] == 0.0         # no drift without steering
    # sparsity: v uses only latents that fire on the training data
    assert re.search(r"latents with v_i != 0: \d+; of those, never active: 0\b", text)
    # pruning: three rows of scores in [0, 1], the same unsteered score for every K
    pruned = re.findall(rf"^\s*(8|32|all \(\d+\))\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", text, re.M)
    assert [p[0] for p in pruned][:2] == ["8", "32"] and len(pruned) == 3
    assert all(0 <= float(x) <= 1 for p in pruned for x in p[1:4]) and len({p[2] for p in pruned}) == 1
    # every plot was drawn
    pngs = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert pngs >= 5

# ---------------------------------------------------------------------------------------------- benchmarks/
# Each benchmark script runs in --quick mode and must write a JSON with every field it documents
# (the values are timings and scores of random models, so only their presence is checked).

BENCHMARK_KEYS = {
    "bench_train_step.py": {
        "top": ["benchmark", "quick", "shapes", "machine", "measured", "variants", "ratios", "targets",
                "b_c_loss_max_abs_difference", "reported_in_issue", "note"],
        "variants": ["a_floor", "b_yapo", "c_naive"],
        "per_variant": ["median_step_s", "median_cpu_s", "step_s", "peak_growth_mb", "peak_rss_mb",
                        "baseline_rss_mb", "losses_first_round"],
        "ratios": ["b_over_a", "c_over_b"],
    },
    "bench_generate.py": {
        "top": ["benchmark", "quick", "shapes", "machine", "measured", "unsteered_ms_per_token", "variants",
                "target", "note"],
        "variants": ["unsteered", "dense", "sparse full", "sparse top-64"],
        "per_variant": ["median_s", "tokens_per_s", "relative_to_unsteered", "seconds", "hook_us_per_token",
                        "hook_share_of_token_time"],
    },
    "bench_pruning.py": {
        "top": ["benchmark", "quick", "shapes", "args", "machine", "vector", "rows", "note"],
        "rows": ["k", "latents", "norm_share", "score_minus_1", "score_0", "score_plus_1", "effect",
                 "share_of_effect", "drift_kl_plus_1"],
        "ks": ["8", "32", "128", "all (512)"],
    },
    "bench_convergence.py": {
        "top": ["benchmark", "quick", "shapes", "machine", "decoder_row_norm", "summary", "curves", "png", "note"],
        "summary": ["size", "method", "steps_to_loss_below_0.5", "steps_to_loss_below_0.1", "steps_to_accuracy_1",
                    "min_loss", "last_epoch_loss", "seconds_per_run"],
        "spread": ["mean", "std", "reached", "per_seed"],
    },
}


@pytest.mark.parametrize("script", sorted(BENCHMARK_KEYS))
def test_benchmark_quick_mode_writes_every_field(script, tmp_path):
    out = tmp_path / "x.json"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    keys = BENCHMARK_KEYS[script]
    assert set(keys["top"]) <= set(data) and data["quick"] is True
    if "variants" in keys:
        assert set(data["variants"]) == set(keys["variants"])
        for v in data["variants"].values():
            assert set(keys["per_variant"]) <= set(v)
    if "ratios" in keys:
        assert set(keys["ratios"]) <= set(data["ratios"])
    if "rows" in keys:
        assert [str(r["k"]) for r in data["rows"]] == keys["ks"]
        assert all(set(keys["rows"]) <= set(r) for r in data["rows"])
    if "summary" in keys:
        assert {(s["size"], s["method"]) for s in data["summary"]} == {(size, m) for size in ("tiny", "small")
                                                                       for m in ("YaPO", "BiPO")}
        for s in data["summary"]:
            assert set(keys["summary"]) <= set(s)
            assert set(keys["spread"]) <= set(s["steps_to_loss_below_0.1"]) and len(s["min_loss"]["per_seed"]) == 3
        assert (tmp_path / "convergence.png").stat().st_size > 0
    assert "random" in data["note"].lower()
