"""Does steering cost general knowledge? The paper checks MMLU with the vector attached; this runs the same recipe
with EleutherAI's lm-evaluation-harness on a small local task (benchmarks/knowledge: 60 easy four-way questions
written for this project, zero-shot, scored by the log-likelihood of each answer) on the local Gemma 3 270M,
unsteered and steered at m = -1 and +1 with a YaPO and a BiPO vector: accuracy with its standard error. With
--at-kl, also at the multipliers of each sign where the vector's measured drift KL is the same for both methods
(read from the sweep unit's JSON beside the vector), so that the two cost the same disturbance.

    pip install lm-eval==0.4.13
    python benchmarks/knowledge_check.py --yapo runs/<YaPO run>/vector.safetensors \
        --bipo runs/<BiPO run>/vector.safetensors
    python benchmarks/knowledge_check.py --at-kl 0.05 0.2 \
        --yapo benchmarks/results/local/sweep/power_seeking/YaPO_seed0.safetensors \
        --bipo benchmarks/results/local/sweep/power_seeking/BiPO_seed0.safetensors      # the JSON in results/

The vectors come from `yapo.py` or `sweep.py` runs on the local model, each read back with the arguments stored in
its file; run from the repository root. The JSON in results/ is the last command above: the sweep's committed
power_seeking vectors of seed 0 (the committed SAE). The JSON goes to benchmarks/results/knowledge_check.json.
The body of main's loop is the README's recipe, line for line.
"""

import json
import time
from pathlib import Path

import common  # first: puts the repository root on sys.path and silences progress bars

import local_gemma3  # noqa: E402


def record(name, m, lam, path, args, sae, out):
    return {"vector": name, "multiplier": m, "lam": lam, "path": path, "seed": args.seed,
            "sae_sha256": local_gemma3.sae_fingerprint(sae) if sae is not None else None,
            **{k.split(",")[0]: x for k, x in out["results"]["yapo_knowledge"].items() if k != "alias"}}


def calibrated(path, kl):
    """The rows a sweep unit evaluated at the multipliers whose measured drift KL is within 5 % of kl, by side."""
    unit = json.loads(Path(path).with_suffix(".json").read_text())
    return {side: row for side, row in unit["at_kl"][str(kl)].items() if row is not None}


def main(argv=None):
    p = common.parser(__file__, __doc__.strip().split("\n")[0])
    p.add_argument("--yapo", required=True, help="a YaPO vector.safetensors of the local model")
    p.add_argument("--bipo", required=True, help="a BiPO vector.safetensors of the local model")
    p.add_argument("--at-kl", type=float, nargs="*", default=[],
                   help="also at the calibrated multipliers of these drifts (a sweep unit's JSON beside the vector)")
    opts = p.parse_args(argv)
    t0 = time.perf_counter()
    results = {}
    for name, path in (("YaPO", opts.yapo), ("BiPO", opts.bipo)):
        print(f"{name}: {path}")
        # --- the README's recipe ---------------------------------------------------------------------------
        import json, lm_eval, yapo
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from safetensors import safe_open

        args = yapo.Args(**json.loads(safe_open(path, "pt").metadata()["args"]))   # as the vector was trained
        device, dtype = yapo.pick_device_dtype(args.device, args.dtype)
        model, tok = yapo.load_model(args.model, device, dtype)
        sae = yapo.load_sae(args.sae, args.sae_id, device, dtype) if yapo.uses_sae(args.method) else None
        v, lam = yapo.load_vector(path, args, sae, model.config.hidden_size, device)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
        tasks = TaskManager(include_path="benchmarks/knowledge")
        for m in (-1.0, 0.0, 1.0):
            with yapo.steering(model, args.layer, v, m * lam, sae):
                out = lm_eval.simple_evaluate(model=lm, tasks=["yapo_knowledge"], task_manager=tasks)
            print(m, out["results"]["yapo_knowledge"])
        # -----------------------------------------------------------------------------------------------------
            results[f"{name} m={m:g}"] = record(name, m, lam, path, args, sae, out)
        for kl in opts.at_kl:                                      # the same at equal drift: a cost per disturbance
            for side, row in calibrated(path, kl).items():
                with yapo.steering(model, args.layer, v, row["multiplier"] * lam, sae):
                    out = lm_eval.simple_evaluate(model=lm, tasks=["yapo_knowledge"], task_manager=tasks)
                results[f"{name} KL {kl:g} {side}"] = record(name, row["multiplier"], lam, path, args, sae, out) | {
                    "at_kl": kl, "drift_kl": row["drift_kl"]}
    rows = [{"run": k} | v for k, v in results.items()]
    report = {"benchmark": "knowledge_check", "task": "benchmarks/knowledge/yapo_knowledge.yaml", "questions": 60,
              "chance": 0.25, "model": str(local_gemma3.MODEL_DIR.relative_to(common.ROOT)), "runs": results,
              "seconds": time.perf_counter() - t0, "machine": common.machine(),
              "note": "Zero-shot, no chat template (a pretrained model); acc is the share of questions whose correct "
                      "answer has the highest log-likelihood, acc_norm the same per byte; stderr is the harness's."}
    common.print_table(rows, [("run", "run"), ("acc", "acc"), ("acc_stderr", "± stderr"), ("acc_norm", "acc_norm"),
                              ("acc_norm_stderr", "± stderr")])
    common.write_json(opts.out, report)
    print(json.dumps({k: {m: v[m] for m in ("acc", "acc_stderr")} for k, v in results.items()}))
    return report


if __name__ == "__main__":
    main()
