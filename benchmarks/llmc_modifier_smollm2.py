"""UniPruningModifier inside llm-compressor against `unipruning prune`, on SmolLM2-135M and the windows of
benchmarks/quality_smollm2.py (16 x 512 calibration windows of the Shakespeare split, seed 0; 32 x 512 held-out
windows of each domain).

    pip install -e '.[bench]'          # llm-compressor 0.14 (and the demo model's reader)
    python benchmarks/llmc_modifier_smollm2.py      # results in benchmarks/results/llmc-modifier-smollm2-cpu.*

Per setting (0.5 with the default allocation, auto = owl-row; 2:4), each in its own oneshot on the same
calibration_loader (the windows in their order, one per batch):
- prune: `unipruning prune` (the CLI, its own process) with the same windows, settings and defaults;
- modifier: [UniPruningModifier] (its calibration pass to itself: masks cut after the last layer);
- llmc-wanda: [WandaPruningModifier], llm-compressor's own Wanda, with the same sparsity / mask_structure;
- with --fp8, both recipes followed by QuantizationModifier(FP8_DYNAMIC) (oneshot's default pipeline, each
  modifier its own pass), perplexity of the fake-quantized model.
Reported per run: the entries whose keep/drop differs from prune's, perplexity on the calibration-domain check
windows (--check-windows x 512 at seed 1, as benchmarks/quality_smollm2.py's 16) and on held-out text per
domain, wall time of the prune or of oneshot. One JSON per run in --work/runs: a stopped run keeps what
finished and the same command skips it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_peers as bp  # noqa: E402

SETTINGS = ("0.5", "2:4")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="default: the demo's converted SmolLM2-135M-Instruct")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--check-windows", type=int, default=16)
    p.add_argument("--layers", type=int, help="keep the first N decoder blocks (to test the harness)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--fp8", action="store_true", help="also each recipe followed by FP8_DYNAMIC quantization")
    p.add_argument("--work", help="default: $UNIPRUNING_CACHE/bench-llmc-modifier")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "llmc-modifier-smollm2-cpu.json"))
    args = p.parse_args(argv)
    base = os.environ.get("UNIPRUNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unipruning")
    args.work = args.work or os.path.join(base, "bench-llmc-modifier")
    args.calib, args.seed, args.eval_seqlen = "shakespeare", 0, 512
    return args


def modifier_options(setting: str) -> dict:
    return {"mask_structure": setting} if ":" in setting else {"sparsity": float(setting)}


def run_prune(ctx: dict, args, setting: str) -> float:
    """`unipruning prune` into --work (once); the wall seconds it took."""
    out = os.path.join(args.work, "ckpt", f"prune-{setting.replace(':', 'of')}")
    timing = os.path.join(args.work, "runs", f"prune-seconds-{setting.replace(':', 'of')}.json")
    if os.path.isfile(os.path.join(out, "pruning_report.json")) and os.path.isfile(timing):
        with open(timing) as f:
            return json.load(f)["wall_seconds"]
    cmd = [sys.executable, "-m", "unipruning", "prune", "--model", ctx["model"], "--out", out, "--overwrite",
           "--calib", ctx["calib"], "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--seed", str(args.seed), *(["--pattern", setting] if ":" in setting else ["--sparsity", setting])]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    bp.write_json(timing, {"wall_seconds": seconds, "command": " ".join(cmd)})
    return seconds


def recipe(setting: str, method: str) -> list:
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from unipruning.integrations.llmcompressor import UniPruningModifier

    # llm-compressor's mask_structure 2:4 prunes 2 of every 4: unipruning's 2:4 (keeps 2); sparsity is ignored
    options = {"sparsity": 0.5, "mask_structure": setting} if ":" in setting else {"sparsity": float(setting)}
    cls = UniPruningModifier if method.startswith("modifier") else WandaPruningModifier
    stages = [cls(ignore=["re:.*lm_head"], **options)]
    if method.endswith("+fp8"):
        stages.append(QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["re:.*lm_head"]))
    return stages


def run_oneshot(ctx: dict, setting: str, method: str):
    """The model after oneshot with the method's recipe, and the wall seconds of oneshot."""
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from unipruning.integrations.llmcompressor import calibration_loader

    model = AutoModelForCausalLM.from_pretrained(ctx["model"], dtype=torch.float32)
    stages = recipe(setting, method)
    start = time.perf_counter()
    oneshot(model=model, dataset=calibration_loader(torch.load(ctx["windows"]["path"])), recipe=stages)
    return model, time.perf_counter() - start


def keep_masks(model) -> dict:
    from unipruning.models import model_matrices, weight_of

    return {m.name: weight_of(model, m) != 0 for m in model_matrices(model)}


def perplexities(model, ctx: dict) -> dict:
    import torch

    from unipruning.evaluate import perplexity

    evals = {**ctx["check"], **ctx["eval"]}
    return {d: perplexity(model, torch.load(e["path"]), torch.device("cpu"), 8) for d, e in evals.items()}


def measure(ctx: dict, args, setting: str, method: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        os.path.join(args.work, "ckpt", f"prune-{setting.replace(':', 'of')}"), dtype=torch.float32)
    ours = keep_masks(reference)
    if method == "prune":
        model, seconds = reference, ctx["prune_seconds"][setting]
    else:
        model, seconds = run_oneshot(ctx, setting, method)
    theirs = keep_masks(model)
    differing = sum(int((theirs[n] != ours[n]).sum()) for n in ours)
    total = sum(k.numel() for k in ours.values())
    kept = sum(int(k.sum()) for k in theirs.values())
    return {"method": method, "setting": setting, "wall_seconds": seconds, "mask_entries_differing": differing,
            "mask_entries": total, "sparsity": 1 - kept / total, "perplexity": perplexities(model, ctx),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def table(records: list[dict]) -> str:
    domains = sorted(records[0]["perplexity"])
    lines = ["| setting | run | masks differing from prune | sparsity | " + " | ".join(f"ppl {d}" for d in domains)
             + " | wall s |", "|---|---|---|---|" + "---|" * len(domains) + "---|"]
    for r in records:
        ppl = " | ".join(f"{r['perplexity'][d]:.3f}" for d in domains)
        lines.append(f"| {r['setting']} | {r['method']} | {r['mask_entries_differing']} of {r['mask_entries']} | "
                     f"{r['sparsity']:.4f} | {ppl} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def check_windows(ctx: dict, args) -> dict:
    """--check-windows calibration-domain windows at seed + 1 (benchmarks/quality_smollm2.py's, which takes 16)."""
    from transformers import AutoTokenizer

    from unipruning.data import calibration_windows, windows_hash

    ids = calibration_windows(AutoTokenizer.from_pretrained(ctx["model"]), ctx["calib"], args.check_windows,
                              args.eval_seqlen, args.seed + 1)
    path = os.path.join(args.work, f"check-{windows_hash(ids)[:16]}.pt")
    bp.save_windows(ids, path)
    return {"calib-check": {"path": path, "sha256": windows_hash(ids), "windows": args.check_windows,
                            "seqlen": args.eval_seqlen}}


def dense(ctx: dict, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ctx["model"], dtype=torch.float32)
    return {"method": "dense", "setting": "", "wall_seconds": 0.0, "mask_entries_differing": 0, "mask_entries": 0,
            "sparsity": 0.0, "perplexity": perplexities(model, ctx),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def cached(args, name: str, compute) -> dict:
    path = os.path.join(args.work, "runs", f"{name.replace(':', 'of')}.json")
    if not os.path.isfile(path):
        bp.write_json(path, compute())
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> None:
    args = parse_args(argv)
    ctx = bp.prepare(args)
    ctx["check"] = check_windows(ctx, args)
    ctx["prune_seconds"] = {}
    records = [cached(args, "dense", partial(dense, ctx, args))]
    print(table(records), end="", flush=True)
    for setting in args.settings:
        ctx["prune_seconds"][setting] = run_prune(ctx, args, setting)
        methods = ["prune", "modifier", "llmc-wanda"] + (["modifier+fp8", "llmc-wanda+fp8"] if args.fp8 else [])
        for method in methods:
            records.append(cached(args, f"{method}-{setting}", partial(measure, ctx, args, setting, method)))
            print(table(records[-1:]).splitlines()[-1], flush=True)
    evals = {d: {k: v for k, v in e.items() if k != "text"} for d, e in ctx["eval"].items()}
    meta = {"model": ctx["model"], "calibration": ctx["windows"], "eval": evals, "check": ctx["check"],
            "versions": bp.versions(), "device": bp.device_name(),
            "threads": os.environ.get("OMP_NUM_THREADS"), "load_average_at_end": os.getloadavg()}
    bp.write_json(args.out, {**meta, "results": records})
    _, cpu = bp.device_name()
    head = (f"SmolLM2-135M-Instruct (float32), {args.nsamples} x {args.seqlen} calibration windows ({args.calib}, "
            f"seed {args.seed}), each method in its own process or oneshot; perplexity on {args.check_windows} "
            f"calibration-domain check windows and {args.eval_windows} held-out windows per domain (seqlen "
            f"{args.eval_seqlen}); {cpu}, OMP_NUM_THREADS={meta['threads']}, "
            f"{datetime.date.today().isoformat()}, load average at the end {meta['load_average_at_end'][0]:.1f}. "
            "wall s: oneshot's time, or the `unipruning prune` process's (start-up, reading and writing the "
            "checkpoint included). `python benchmarks/llmc_modifier_smollm2.py " + " ".join(argv or sys.argv[1:])
            + "`\n\n")
    with open(args.out[: -len(".json")] + ".md", "w") as f:
        f.write(head + table(records))


if __name__ == "__main__":
    main()
