"""Feedback full (the paper's LM-loss feedback along an AdamW trajectory) against feedback none, on SmolLM2-135M.

    OMP_NUM_THREADS=1 python benchmarks/feedback_smollm2.py     # results in benchmarks/results

The protocol is benchmarks/quality_smollm2.py's (16 x 512 calibration windows of the Shakespeare plays minus
three held-out ones, seed 0, batch 1: 16 steps), with obs_generalize.py's two check texts (calibration-domain
windows at seed 1; Debian's licence texts). Metric stochria, allocation owl-row (the default, auto) for the
unstructured settings, per group of 4 at 2:4. Feedback none: ONE `prune` (--sparsity 0.5) computes the
saliency (its saliency does not depend on the target), then `mask` cuts 0.5, 0.7 and 2:4 from it. Feedback
full: the trajectory's saliency depends on the target mask, so one `prune --feedback full` per setting
writes that setting's model. Each command's wall time and peak RSS are measured as a whole process. Every
model is evaluated on the check texts (what a preset may be chosen on) and on the held-out texts (their
first 8 windows, the sets of benchmarks/results/quality-smollm2-cpu.json).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_peers as bp  # noqa: E402
import obs_generalize as og  # noqa: E402
import quality_smollm2 as qs  # noqa: E402

SETTINGS = ("0.5", "2:4", "0.7")  # 0.7 last: the one to drop when time is short


def cut_options(setting: str) -> list[str]:
    return qs.setting_options(setting) + ([] if ":" in setting else ["--allocation", "owl-row"])


def jobs(args, ctx, full_settings=SETTINGS) -> list[dict]:
    """Feedback none's calibration, then per setting feedback full's run and feedback none's cut."""
    where = f"{qs.saliency_dir(args, 'stochria')}-feedback-none"
    prune = ["-m", "unipruning", "prune", "--model", ctx["model"], *qs.window_options(args, ctx)]
    todo = [{"name": "calibrate-stochria-feedback-none", "setting": "0.5", "keep": True, "eval": False,
             "cmd": prune[:5] + ["--out", where] + prune[5:] + ["--sparsity", "0.5"]}]
    mask = ["-m", "unipruning", "mask", "--model", ctx["model"], "--out", "{out}", "--saliency",
            os.path.join(where, "saliency")]
    for s in full_settings:  # side by side per setting
        todo += [{"name": "feedback-full", "setting": s, "cmd": prune + ["--out", "{out}", "--feedback", "full",
                                                                          *cut_options(s)]},
                 {"name": "feedback-none", "setting": s, "cmd": mask + cut_options(s)}]
    return todo


def table(records: list[dict], domain: str) -> str:
    lines = [f"| setting ({domain}) | feedback none | feedback full | full / none |", "|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in records if r["method"] == "feedback-full"):
        by = {r["method"]: r["perplexity"][domain] for r in records if r["setting"] == setting and "perplexity" in r}
        if len(by) == 2:
            none, full = by["feedback-none"], by["feedback-full"]
            lines.append(f"| {setting} | {none:.2f} | {full:.2f} | {full / none:.3f} |")
    return "\n".join(lines)


def cost(records: list[dict]) -> str:
    lines = ["| command | wall s | peak RSS GiB |", "|---|---|---|"]
    lines += [f"| {r['method']} {r['setting']} | {r['wall_seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} |"
              for r in records if "wall_seconds" in r]
    return "\n".join(lines)


def main(argv=None) -> None:
    mine = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mine.add_argument("--settings", nargs="+", default=list(SETTINGS), help="default 0.5 0.7 2:4")
    mine, argv = mine.parse_known_args(argv)
    args = qs.parse_args(["--work", os.path.join(os.environ.get("UNIPRUNING_CACHE") or
                                                 os.path.join(os.path.expanduser("~"), ".cache", "unipruning"),
                                                 "bench-obs-generalize"), *argv])
    ctx = og.context(args)
    # every cut on the check texts and the held-out ones (their first 8 windows, as the earlier table)
    ctx = {**ctx, "eval": {**ctx["check"], **og.earlier_evals(ctx)}}
    dense = qs.run_dense({"name": "dense", "setting": "", "cmd": []}, args, ctx)
    records = [dense]
    out = os.path.join(ROOT, "benchmarks", "results", f"feedback-smollm2-{bp.device_name()[0]}.json")
    for job in jobs(args, ctx, mine.settings):
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
