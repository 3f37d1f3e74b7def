"""`--refine swaps` from the CLI on SmolLM2-135M (issue 24, part 2): the defaults with and without it.

    OMP_NUM_THREADS=1 UNIPRUNING_CACHE=/work/cache python benchmarks/refine_cli_smollm2.py \\
        --settings 0.5 2:4 0.7 --iters 5 50          # results in benchmarks/results/refine-smollm2-cpu.*

quality_smollm2.py's protocol and windows (bench_peers.prepare: 16 x 512 Shakespeare calibration windows,
the held-out plays and pydoc; its calibration-domain check windows at seed 1), each command in its own
process. Jobs:
- `defaults` / `defaults-refine`: whole `unipruning prune` commands, the defaults without and with
  `--refine swaps` (its default iterations), evaluated on the check windows and the held-out texts;
- `mask` / `mask-refine`: `mask` from the first setting's defaults' saliency (no recalibration: the same
  bytes as `prune` with the same options), every setting without and with `--refine swaps`; the held-out
  texts at every setting; `mask-refine-itersN`: `--refine-iters N` there (how the default number of
  iterations is chosen: on the check windows, the held-out texts beside them).
Without --only every job runs in order in one process; on a loaded machine `--only NAME@SETTING ...` in
parallel processes sharing --work (a stopped run skips what finished), then `--report`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_peers as bp  # noqa: E402
import quality_smollm2 as q  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["0.5", "0.7", "2:4"])
    p.add_argument("--iters", nargs="*", type=int, default=[], help="refine-iters tried at the first setting")
    p.add_argument("--only", nargs="*", metavar="NAME@SETTING",
                   help="run only these jobs (e.g. defaults-refine@2:4), others' records read if finished")
    p.add_argument("--check-only", action="store_true", help="evaluate every mask job on the check windows only")
    p.add_argument("--load", help="the load the runs shared the machine with, for the table's header")
    p.add_argument("--report", action="store_true", help="write the results from the finished runs in --work only")
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "refine-cli-smollm2"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "refine-smollm2-cpu.json"))
    args = p.parse_args(argv)
    args.nsamples, args.seqlen, args.seed, args.eval_seqlen, args.eval_windows = 16, 512, 0, 512, 32
    args.model, args.calib, args.layers = None, "shakespeare", None
    return args


def jobs(args, ctx) -> list[dict]:
    prune = ["-m", "unipruning", "prune", "--model", ctx["model"], "--out", "{out}", *q.window_options(args, ctx)]
    todo = []
    for s in args.settings:
        todo.append({"name": "defaults", "setting": s, "keep": s == args.settings[0],
                     "cmd": prune + q.setting_options(s)})
        todo.append({"name": "defaults-refine", "setting": s, "cmd": prune + q.setting_options(s)
                     + ["--refine", "swaps"]})
    return todo


def iter_jobs(args, ctx, saliency: str) -> list[dict]:
    """`mask` from the defaults' saliency (no recalibration): every setting cut as the defaults cut it, and
    with `--refine swaps` (its default iterations, and --iters at the first setting). Every setting on the held-out
    texts too (a setting that helps the check windows must not hurt another domain; `--check-only`: none); the
    --iters runs too."""
    mask = ["-m", "unipruning", "mask", "--model", ctx["model"], "--out", "{out}", "--saliency", saliency]
    refine = [*q.window_options(args, ctx), "--refine", "swaps"]
    todo = []
    for s in args.settings:
        cut = mask + q.setting_options(s)
        check_only = args.check_only
        todo += [{"name": "mask", "setting": s, "check_only": check_only, "cmd": cut},
                 {"name": "mask-refine", "setting": s, "check_only": check_only, "cmd": cut + refine}]
    first = mask + q.setting_options(args.settings[0]) + refine
    return todo + [{"name": f"mask-refine-iters{n}", "setting": args.settings[0], "check_only": args.check_only,
                    "cmd": first + ["--refine-iters", str(n)]} for n in args.iters]


def tag_of(job: dict, ctx: dict) -> str:
    return f"{job['name']}-{job['setting'].replace(':', 'of')}-{q.key(job, ctx)}"


def run(job: dict, args, ctx: dict) -> dict:
    """One measured process, its evaluation and its report's refinement summary (cached in --work/runs)."""
    tag = tag_of(job, ctx)
    path = os.path.join(args.work, "runs", f"{tag}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    out = os.path.join(args.work, "ckpt", tag)
    cmd = [c.replace("{out}", out) for c in job["cmd"]]
    shutil.rmtree(out, ignore_errors=True)
    print(f"{tag}: running", flush=True)
    record = {"method": job["name"], "setting": job["setting"],
              "date": datetime.datetime.now().isoformat("T", "seconds"),
              "command": " ".join(["OMP_NUM_THREADS=1", sys.executable, *cmd])}
    record.update(bp.measured(cmd, os.path.join(args.work, "logs"), tag))
    with open(os.path.join(out, "pruning_report.json")) as f:
        own = json.load(f)
    record["own_report"] = {k: own.get(k) for k in ("wall_seconds", "calibration_seconds", "mask", "total")}
    refinement = own.get("refinement")
    if refinement:
        errors = refinement["matrices"].values()
        record["refinement"] = {
            "iters": refinement["iters"], "seconds": refinement.get("seconds"),
            "swaps": sum(e["swaps"] for e in errors),
            "error_after_over_before": sum(e["error_after"] for e in errors) / sum(e["error_before"] for e in errors),
            "matrices_worse": sum(e["error_after"] > e["error_before"] for e in errors)}
    evals = ctx["check"] if job.get("check_only") else {**ctx["check"], **ctx["eval"]}
    record["perplexity"] = bp.evaluate(out, evals)
    pattern = job["setting"] if ":" in job["setting"] else "unstructured"
    record["realised_sparsity"] = bp.realised_sparsity(out, ctx["model"], pattern)
    if job.get("keep"):
        record["kept"] = out
    else:
        shutil.rmtree(out)
    bp.write_json(path, record)
    return record


def markdown(result: dict) -> str:
    rows = ["| setting | command | calib-check | shakespeare | pydoc | prune s (whole command) | refine pass s | "
            "error after / before | swaps |", "|---" * 9 + "|"]
    for r in result["results"]:
        p, ref = r["perplexity"], r.get("refinement") or {}
        cells = [r["setting"], r["method"], *(f"{p[d]:.2f}" if d in p else "" for d in ("calib-check", "shakespeare",
                                                                                      "pydoc")),
                 f"{r['wall_seconds']:.0f}", f"{ref['seconds']:.0f}" if ref.get("seconds") else "",
                 f"{ref['error_after_over_before']:.3f}" if ref else "", str(ref.get("swaps", ""))]
        rows.append("| " + " | ".join(cells) + " |")
    head = (f"SmolLM2-135M-Instruct (float32), {result['calibration']}, {result['device']}, {result['date']}; "
            "each command in its own process, one thread (OMP_NUM_THREADS=1), one command at a time, on a shared "
            f"2-core machine under load from other jobs ({result.get('load', 'load not recorded')}): wall times "
            "vary with the load and compare only roughly. defaults: `unipruning prune` with no method options "
            "(stochria, allocation auto = owl-row, N:M per group); mask: `unipruning mask` from the 0.5 defaults' "
            "saliency with the same options (the bytes `prune` writes); -refine: with `--refine swaps` (default "
            "iterations unless -itersN); refine pass s: the report's refinement seconds (the second pass over the "
            "blocks). Commands: the json.")
    return head + "\n\n" + "\n".join(rows) + "\n"


def finished(args) -> list[dict]:
    """Every finished run in --work, by setting (in --settings' order), then command."""
    runs = os.path.join(args.work, "runs")
    records = []
    for name in sorted(os.listdir(runs)):
        with open(os.path.join(runs, name)) as f:
            records.append(json.load(f))
    order = {s: i for i, s in enumerate(args.settings)}
    return sorted(records, key=lambda r: (order.get(r["setting"], len(order)), r["method"]))


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    ctx = bp.prepare(args)
    ctx["check"] = q.check_windows(ctx, args)
    if args.report:
        records = finished(args)
    else:
        todo = jobs(args, ctx)
        if args.only is not None:
            saliency = os.path.join(args.work, "ckpt", tag_of(todo[0], ctx), "saliency")  # the kept defaults
            chosen = [j for j in todo + iter_jobs(args, ctx, saliency) if f"{j['name']}@{j['setting']}" in args.only]
            records = [run(j, args, ctx) for j in chosen]
        else:
            records = [run(j, args, ctx) for j in todo[:2]]  # the first setting, its iterations, the others
            records += [run(j, args, ctx) for j in iter_jobs(args, ctx, os.path.join(records[0]["kept"],
                                                                                       "saliency"))]
            records += [run(j, args, ctx) for j in todo[2:]]
    result = {"device": bp.device_name()[1], "date": datetime.date.today().isoformat(), "versions": bp.versions(),
              "unipruning_git": q.git_hash(), "calibration": "16 x 512 Shakespeare windows (seed 0)",
              "windows": ctx["windows"], "check": ctx["check"], "results": records,
              **({"load": args.load} if args.load else {})}
    bp.write_json(args.out, result)
    with open(args.out[:-5] + ".md", "w") as f:
        f.write(markdown(result))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
