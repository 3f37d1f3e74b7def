"""Feedback full (the paper's LM-loss feedback along an AdamW trajectory) against feedback none, on SmolLM2-135M.

    OMP_NUM_THREADS=1 python benchmarks/feedback_smollm2.py     # results in benchmarks/results

The protocol is benchmarks/quality_smollm2.py's (16 x 512 calibration windows of the Shakespeare plays minus
three held-out ones, seed 0, batch 1: 16 steps), with obs_generalize.py's two check texts (calibration-domain
windows at seed 1; Debian's licence texts). Per feedback mode ONE `prune` (stochria, --sparsity 0.5,
allocation layer) computes the saliency, its wall time and peak RSS measured as a whole process; then `mask`
cuts 0.5 and 0.7 with allocations layer and owl-row, and 2:4 (per group of 4), from each saliency. Every cut
is evaluated on the check texts (what a preset may be chosen on) and on the held-out texts (their first 8
windows, the sets of benchmarks/results/quality-smollm2-cpu.json).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_peers as bp  # noqa: E402
import obs_generalize as og  # noqa: E402
import quality_smollm2 as qs  # noqa: E402

FEEDBACKS = ("none", "full")
CUTS = [("0.5", "layer"), ("0.5", "owl-row"), ("0.7", "layer"), ("0.7", "owl-row"), ("2:4", None)]


def jobs(args, ctx) -> list[dict]:
    """The two calibrations, then the cuts of each saliency."""
    todo = []
    for fb in FEEDBACKS:
        where = f"{qs.saliency_dir(args, 'stochria')}-feedback-{fb}"  # both calibrated here, side by side
        calibrate = ["-m", "unipruning", "prune", "--model", ctx["model"], "--out", where,
                     *qs.window_options(args, ctx), "--sparsity", "0.5"] + ([] if fb == "none" else ["--feedback", fb])
        todo.append({"name": f"calibrate-stochria-feedback-{fb}", "setting": "0.5", "keep": True, "eval": False,
                     "cmd": calibrate})
        for setting, alloc in CUTS:
            cmd = ["-m", "unipruning", "mask", "--model", ctx["model"], "--out", "{out}", "--saliency",
                   os.path.join(where, "saliency"), *qs.setting_options(setting)]
            todo.append({"name": f"feedback-{fb}-{alloc or 'nm'}", "setting": setting,
                         "cmd": cmd + (["--allocation", alloc] if alloc else [])})
    return todo


def table(records: list[dict], domain: str) -> str:
    lines = [f"| cut ({domain}) | feedback none | feedback full | full / none |", "|---|---|---|---|"]
    for setting, alloc in CUTS:
        by = {r["method"].split("-")[1]: r["perplexity"][domain] for r in records
              if r["setting"] == setting and r["method"].endswith(alloc or "nm") and "perplexity" in r}
        if len(by) == 2:
            lines.append(f"| {setting} {alloc or 'per group'} | {by['none']:.2f} | {by['full']:.2f} | "
                         f"{by['full'] / by['none']:.3f} |")
    return "\n".join(lines)


def cost(records: list[dict]) -> str:
    lines = ["| command | wall s | peak RSS GiB |", "|---|---|---|"]
    lines += [f"| {r['method']} {r['setting']} | {r['wall_seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} |"
              for r in records if "wall_seconds" in r]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = qs.parse_args(["--work", os.path.join(os.environ.get("UNIPRUNING_CACHE") or
                                                 os.path.join(os.path.expanduser("~"), ".cache", "unipruning"),
                                                 "bench-obs-generalize"), *(argv or sys.argv[1:])])
    ctx = og.context(args)
    # every cut on the check texts and the held-out ones (their first 8 windows, as the earlier table)
    ctx = {**ctx, "eval": {**ctx["check"], **og.earlier_evals(ctx)}}
    dense = qs.run_dense({"name": "dense", "setting": "", "cmd": []}, args, ctx)
    records = [dense]
    out = os.path.join(ROOT, "benchmarks", "results", f"feedback-smollm2-{bp.device_name()[0]}.json")
    for job in jobs(args, ctx):
        records.append(qs.run(job, args, ctx))
        head = og.header(args, ctx, "feedback")
        bp.write_json(out, {**head, "eval": ctx["eval"], "results": records})
    md = [head["summary"], "", "Perplexity of each cut; the first two texts choose, the last two are held out.", ""]
    for domain in ctx["eval"]:
        md += [f"Dense {dense['perplexity'][domain]:.2f}.", "", table(records, domain), ""]
    md += ["Each whole command (one thread per process):", "", cost(records)]
    with open(out[:-5] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
