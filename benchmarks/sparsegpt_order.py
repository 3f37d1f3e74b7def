"""Why our SparseGPT beats llm-compressor's on the same windows: the order of the Hessians inside a block.

    python benchmarks/sparsegpt_order.py --nsamples 16 --eval-windows 8    # after (or beside) quality_smollm2.py

The same SmolLM2-135M, windows and evaluation as quality_smollm2.py (its runs are reused from the same --work):
llm-compressor 0.14's SparseGPTModifier, our `--metric sparsegpt --reconstruct obs` (true-sequential: q/k/v,
then o, gate/up, down, each group's Hessian from the block as reconstructed so far), and ours with
`--no-true-sequential`: every group's Hessian from the block as it came in, before any of it was pruned,
which is what llm-compressor's sequential pipeline does (its hooks collect every module's Hessian in one
forward of the dense layer, then compress them all). The two share the rest: dampening 0.01 of the mean
diagonal, 128-column lazy batches, the per-batch mask rule, and the pruned stream between blocks.
If the variant lands on llm-compressor's perplexity, the order is the difference.

Output: sparsegpt-order-smollm2-<device>.json (records with commands) and .md.
"""

from __future__ import annotations

import datetime
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_peers as bp  # noqa: E402
import quality_smollm2 as quality  # noqa: E402

COMPARED = ("llmc-sparsegpt", "ours-sparsegpt")
VARIANT = "ours-sparsegpt-no-true-sequential"


def order_jobs(args, ctx) -> list[dict]:
    """llm-compressor's and our SparseGPT as quality_smollm2 runs them, and ours in llm-compressor's order."""
    todo = []
    for job in quality.jobs(args, ctx, alpha=1.0):
        if job["name"] in COMPARED:
            todo.append(job)
            if job["name"] == "ours-sparsegpt":
                todo.append({**job, "name": VARIANT, "cmd": job["cmd"] + ["--no-true-sequential"]})
    return todo


def main(argv=None) -> None:
    args = quality.parse_args(["--settings", "0.5", "0.7", "2:4", *(argv if argv is not None else sys.argv[1:])])
    ctx = bp.prepare(args)
    ctx["check"] = {}
    records = [quality.run_dense({"name": "dense", "setting": "", "cmd": []}, args, ctx)]
    records += [quality.run(job, args, ctx) for job in order_jobs(args, ctx)]
    device = bp.device_name()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"sparsegpt-order-smollm2-{device[0]}.json")
    result = {"device": device[1], "date": datetime.date.today().isoformat(), "versions": bp.versions(),
              "unipruning_git": quality.git_hash(), "model": {"path": ctx["model"], "sha256": ctx["model_sha256"]},
              "calibration": ctx["windows"], "eval": ctx["eval"], "settings": args.settings, "results": records}
    bp.write_json(out, result)
    md = [f"SmolLM2-135M-Instruct (float32), {args.nsamples} x {args.seqlen} calibration windows, {device[1]}, "
          f"{result['date']}; held-out perplexity (seqlen {args.eval_seqlen}): SparseGPT in two orders."]
    for domain in ctx["eval"]:
        md += ["", quality.table(records, args.settings, domain)]
    with open(out[:-5] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
