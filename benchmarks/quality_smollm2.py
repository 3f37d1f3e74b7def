"""Quality on a real pretrained model: SmolLM2-135M pruned by unipruning and by llm-compressor, same windows.

    pip install -e '.[bench]'
    python benchmarks/quality_smollm2.py --nsamples 16 --eval-windows 32    # results in benchmarks/results

The model, texts, calibration windows and evaluation windows are bench_peers.py's (its `prepare`): SmolLM2-
135M-Instruct dequantized to float32, calibration on the Shakespeare plays minus three held-out ones,
held-out perplexity on those plays and on the held-out part of Python's own documentation (pydoc topics,
a second domain of modern prose), every method on the same saved windows and evaluated by the same
function, each command in its own process (wall time and the process's own peak RSS).

Methods, per setting (`--settings`, default 0.5 0.6 0.7 2:4):
- llm-compressor 0.14's `oneshot` with WandaPruningModifier and SparseGPTModifier (peers/llmc_oneshot.py);
- unipruning mask only: ONE `prune` per metric (stochria = the defaults, ria, wanda and magnitude as one
  step over all windows), then every setting and allocation (layer, row, global, owl, owl-row) cut by `mask`
  from that saliency; the time column of a cut is the `mask` command's, the calibration's is its own row;
- unipruning with reconstruction: `mask --reconstruct obs` from the stochria saliency (Γ masks, per matrix
  and, unstructured, owl-row), the same with `--guide-alpha` (Γ-guided, per matrix and with owl's counts),
  and `prune --metric sparsegpt --reconstruct obs` (our SparseGPT).
The guide's alpha is chosen at the first setting among `--alphas` by perplexity on calibration-domain
windows (the calibration text at another seed), never on the held-out texts.

Outputs: quality-smollm2-<device>.json (every record with its command), .md (the table), .png.
One result file per run in --work/runs: a stopped run keeps what finished and the same command skips it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_peers as bp  # noqa: E402

METRICS = {"stochria": [], "ria": ["--metric", "ria"], "wanda": ["--metric", "wanda", "--batch-size", "{n}"],
           "magnitude": ["--metric", "magnitude", "--batch-size", "{n}"]}
# mask-only cuts: (metric of the saliency, allocation); N:M settings take the first of each metric only
CUTS = [("stochria", "layer"), ("stochria", "row"), ("stochria", "global"), ("stochria", "owl"),
        ("stochria", "owl-row"), ("ria", "layer"), ("ria", "row"), ("ria", "global"), ("wanda", "layer"),
        ("wanda", "row"), ("wanda", "global"), ("wanda", "owl-row"), ("magnitude", "layer")]


def parse_args(argv=None) -> argparse.Namespace:
    p = bp._Parser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["0.5", "0.6", "0.7", "2:4"],
                   help="sparsities and N:M patterns (default 0.5 0.6 0.7 2:4)")
    p.add_argument("--nsamples", type=bp._positive, default=16)
    p.add_argument("--seqlen", type=bp._positive, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alphas", nargs="+", type=float, default=[0.5, 1.0, 2.0], help="Γ-guided alphas tried")
    p.add_argument("--eval-seqlen", type=bp._positive, default=512)
    p.add_argument("--eval-windows", type=bp._positive, default=32)
    p.add_argument("--preset-checks", action="store_true",
                   help="also run the presets' candidates at 0.5 and 0.7 on the calibration-domain check windows")
    p.add_argument("--skip", nargs="*", default=[], help="method names to leave out (e.g. llmc-sparsegpt)")
    p.add_argument("--layers", type=bp._positive, help="keep the first N decoder blocks (to test the harness)")
    p.add_argument("--work", help="default: $UNIPRUNING_CACHE/bench-quality-smollm2")
    p.add_argument("--out", help="default: benchmarks/results/quality-smollm2-<device>.json")
    args = p.parse_args(argv)
    for s in args.settings:
        (bp._pattern if ":" in s else bp._fraction)(s)
    args.model, args.calib = None, "shakespeare"
    base = os.environ.get("UNIPRUNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unipruning")
    args.work = args.work or os.path.join(base, "bench-quality-smollm2")
    return args


def setting_options(setting: str) -> list[str]:
    return ["--pattern", setting] if ":" in setting else ["--sparsity", setting]


def window_options(args, ctx) -> list[str]:
    return ["--calib", ctx["calib"], "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--seed", str(args.seed)]


def saliency_dir(args, metric: str) -> str:
    return os.path.join(args.work, "saliency", f"{metric}-{args.nsamples}x{args.seqlen}")


def jobs(args, ctx, alpha: float | None) -> list[dict]:
    """Every run of the table, in order: (name, setting, command builder). `alpha` None: the sweep first."""
    n, model, out = str(args.nsamples), ctx["model"], "{out}"

    def prune_into(where: str) -> list[str]:
        return ["-m", "unipruning", "prune", "--model", model, "--out", where, *window_options(args, ctx)]

    def saliency_of(metric: str) -> list[str]:
        return ["--saliency", os.path.join(saliency_dir(args, metric), "saliency")]

    prune, mask = prune_into(out), ["-m", "unipruning", "mask", "--model", model, "--out", out]
    used = {m for m, a in CUTS if f"ours-{m}-{a}" not in args.skip} | {"stochria"}
    todo = [{"name": f"calibrate-{m}", "setting": "0.5", "keep": True, "eval": False,
             "cmd": prune_into(saliency_dir(args, m)) + ["--sparsity", "0.5"] + [o.format(n=n) for o in opts]}
            for m, opts in METRICS.items() if m in used]
    first = args.settings[0]
    # all windows in one forward: the reconstruction's Hessians are sums over windows (batching changes
    # only the order of the sums), and one forward of 16 windows is cheaper than 16 on a CPU
    obs = ["--reconstruct", "obs", *window_options(args, ctx), "--batch-size", n]
    for a in args.alphas if alpha is None and len(args.alphas) > 1 else []:
        todo.append({"name": f"sweep-guided-a{a}", "setting": first, "check": True,
                     "cmd": mask + saliency_of("stochria") + setting_options(first) + obs + ["--guide-alpha", str(a)]})
    if alpha is None:
        return todo
    for s in args.settings:
        nm = ":" in s
        for metric in dict.fromkeys(m for m, _ in CUTS) if nm else []:  # N:M: one cut per metric
            todo.append({"name": f"ours-{metric}-layer", "setting": s,
                         "cmd": mask + saliency_of(metric) + setting_options(s)})
        for metric, alloc in [] if nm else CUTS:
            todo.append({"name": f"ours-{metric}-{alloc}", "setting": s,
                         "cmd": mask + saliency_of(metric) + setting_options(s) + ["--allocation", alloc]})
        sal = saliency_of("stochria") + setting_options(s)
        guide = ["--guide-alpha", str(alpha)]
        todo += [{"name": "ours-stochria-obs", "setting": s, "cmd": mask + sal + obs},
                 {"name": f"ours-stochria-guided-a{alpha}", "setting": s, "cmd": mask + sal + obs + guide}]
        if not nm:  # the best mask-only allocation under the OBS pass: fixed masks, and (per matrix) guided
            todo += [{"name": "ours-stochria-owl-row-obs", "setting": s,
                      "cmd": mask + sal + ["--allocation", "owl-row"] + obs},
                     {"name": f"ours-stochria-owl-guided-a{alpha}", "setting": s,
                      "cmd": mask + sal + ["--allocation", "owl"] + obs + guide}]
        todo.append({"name": "ours-sparsegpt", "setting": s, "cmd": prune + setting_options(s)
                     + ["--metric", "sparsegpt", "--reconstruct", "obs", "--batch-size", n]})
        for peer in ("wanda", "sparsegpt"):
            pattern, sparsity = (s, "0.5") if nm else ("unstructured", s)
            todo.append({"name": f"llmc-{peer}", "setting": s,
                         "cmd": [bp.LLMC_RUNNER, "--model", model, "--windows", ctx["windows"]["path"],
                                 "--out", out, "--method", peer, "--sparsity", sparsity, "--pattern", pattern]})
    return [j for j in todo if j["name"] not in args.skip]


# what the presets were chosen between, measured on the calibration-domain check windows (never held out)
PRESET_CHOICES = {"fast": ("ours-stochria-layer", "ours-stochria-row", "ours-stochria-owl-row"),
                  "quality": ("ours-stochria-guided-a{alpha}", "ours-stochria-owl-guided-a{alpha}")}
PRESET_SETTINGS = ("0.5", "0.7")


def preset_checks(args, ctx, alpha: float) -> list[dict]:
    names = {n.format(alpha=alpha) for choice in PRESET_CHOICES.values() for n in choice}
    every = jobs(argparse.Namespace(**{**vars(args), "skip": []}), ctx, alpha)  # --skip is for the table
    return [{**j, "name": f"check-{j['name']}", "check": True} for j in every
            if j["name"] in names and j["setting"] in PRESET_SETTINGS and f"check-{j['name']}" not in args.skip]


def key(job: dict, ctx: dict) -> str:
    spec = {"cmd": job["cmd"], "model": ctx["model_sha256"], "windows": ctx["windows"]["sha256"],
            "eval": {d: e["sha256"] for d, e in ctx["eval"].items()}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def git_hash() -> str | None:
    done = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def check_windows(ctx: dict, args) -> dict:
    """Calibration-domain windows at another seed: what the guide's alpha is chosen on (never held-out)."""
    from transformers import AutoTokenizer

    from unipruning.data import calibration_windows, windows_hash

    ids = calibration_windows(AutoTokenizer.from_pretrained(ctx["model"]), ctx["calib"], 16, args.eval_seqlen,
                              args.seed + 1)
    path = os.path.join(args.work, f"check-{windows_hash(ids)[:16]}.pt")
    bp.save_windows(ids, path)
    return {"calib-check": {"path": path, "sha256": windows_hash(ids), "windows": 16, "seqlen": args.eval_seqlen}}


def run(job: dict, args, ctx: dict) -> dict:
    """One measured process, then its evaluation and realised sparsity; the record (cached in --work/runs)."""
    tag = f"{job['name']}-{job['setting'].replace(':', 'of')}-{key(job, ctx)}"
    path = os.path.join(args.work, "runs", f"{tag}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    out = os.path.join(args.work, "ckpt", tag)
    cmd = [c.replace("{out}", out) for c in job["cmd"]]
    model_dir = cmd[cmd.index("--out") + 1]
    shutil.rmtree(model_dir, ignore_errors=True)
    print(f"{tag}: running", flush=True)
    record = {"method": job["name"], "setting": job["setting"], "nsamples": args.nsamples, "seqlen": args.seqlen,
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([sys.executable, bp.WRAPPER, "REPORT", *cmd])}
    record.update(bp.measured(cmd, os.path.join(args.work, "logs"), tag))
    report = os.path.join(model_dir, "pruning_report.json")
    if os.path.isfile(report):
        with open(report) as f:
            own = json.load(f)
        record["own_report"] = {k: own.get(k) for k in ("wall_seconds", "reconstruction", "mask", "total")}
    if job.get("eval", True):
        evals = ctx["check"] if job.get("check") else ctx["eval"]
        record["perplexity"] = bp.evaluate(model_dir, evals)
        pattern = job["setting"] if ":" in job["setting"] else "unstructured"
        record["realised_sparsity"] = bp.realised_sparsity(model_dir, ctx["model"], pattern)
    if not job.get("keep"):
        shutil.rmtree(model_dir)
    bp.write_json(path, record)
    return record


def choose_alpha(records: list[dict], alphas: list[float]) -> float:
    if len(alphas) == 1:
        return alphas[0]
    sweep = [r for r in records if r["method"].startswith("sweep-guided-a")]
    best = min(sweep, key=lambda r: r["perplexity"]["calib-check"])
    return float(best["method"].rsplit("-a", 1)[1])


def table(records: list[dict], settings: list[str], domain: str) -> str:
    rows = {}
    for r in records:
        if domain in r.get("perplexity", {}):
            for s in settings if r["method"] == "dense" else [r["setting"]]:
                rows.setdefault(r["method"], {})[s] = r
    lines = [f"| method ({domain}) | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for method, by in rows.items():
        cells = [f"{by[s]['perplexity'][domain]:.2f}" if s in by else "" for s in settings]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(records: list[dict], setting: str) -> str:
    lines = [f"| run (setting {setting}) | wall s | peak RSS GiB |", "|---|---|---|"]
    for r in records:
        if r["setting"] == setting and "wall_seconds" in r:
            lines.append(f"| {r['method']} | {r['wall_seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def plot(records: list[dict], settings: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unstructured = [s for s in settings if ":" not in s]
    domains = sorted({d for r in records for d in r.get("perplexity", {}) if d != "calib-check"})
    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4.5), squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        methods = sorted({r["method"] for r in records if domain in r.get("perplexity", {})})
        for method in methods:
            pts = [(float(r["setting"]), r["perplexity"][domain]) for r in records
                   if r["method"] == method and r["setting"] in unstructured and domain in r.get("perplexity", {})]
            if len(pts) > 1 and method != "dense":
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker="o", label=method, linestyle="--" if method.startswith("llmc") else "-")
        dense = [r["perplexity"][domain] for r in records if r["method"] == "dense"]
        if dense:
            ax.axhline(dense[0], color="black", linewidth=0.8, label="dense")
        ax.set_yscale("log")
        ax.set(title=f"SmolLM2-135M, held-out {domain}", xlabel="sparsity", ylabel="perplexity")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # the outputs are rewritten after every run


def write_outputs(args, ctx, records: list[dict], alpha, out: str) -> None:
    device = bp.device_name()
    result = {"device": device[1], "date": datetime.date.today().isoformat(), "versions": bp.versions(),
              "unipruning_git": git_hash(), "model": {"path": ctx["model"], "sha256": ctx["model_sha256"]},
              "calibration": ctx["windows"], "eval": ctx["eval"], "check": ctx["check"], "texts": ctx["texts"],
              "guide_alpha": alpha, "settings": args.settings, "results": records}
    bp.write_json(out, result)
    md = [f"SmolLM2-135M-Instruct (float32), {args.nsamples} x {args.seqlen} calibration windows, "
          f"{device[1]}, {result['date']}; held-out perplexity (seqlen {args.eval_seqlen})."]
    for domain in ctx["eval"]:
        md += ["", table(records, args.settings, domain)]
    md += ["", cost_table(records, args.settings[0]), "", f"Γ-guided alpha chosen: {alpha}", "",
           table([r for r in records if r["method"].startswith(("dense", "sweep"))], [args.settings[0]],
                 "calib-check")]
    checks = [r for r in records if r["method"].startswith(("dense", "check-"))]
    if len(checks) > 1:
        md += ["", "The presets' candidates on the calibration-domain check windows:", "",
               table(checks, list(PRESET_SETTINGS), "calib-check")]
    with open(out[:-5] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    plot(records, args.settings, out[:-5] + ".png")


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    ctx = bp.prepare(args)
    ctx["check"] = check_windows(ctx, args)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"quality-smollm2-{bp.device_name()[0]}.json")
    dense = {"name": "dense", "setting": "", "cmd": []}
    records = [run_dense(dense, args, ctx)]
    records += [run(j, args, ctx) for j in jobs(args, ctx, None)]
    alpha = choose_alpha(records, args.alphas)
    print(f"guide alpha: {alpha}" + (" (calibration-domain check windows)" if len(args.alphas) > 1 else ""),
          flush=True)
    todo = [j for j in jobs(args, ctx, alpha) if not j["name"].startswith("calibrate")]
    for job in (preset_checks(args, ctx, alpha) if args.preset_checks else []) + todo:
        records.append(run(job, args, ctx))
        write_outputs(args, ctx, records, alpha, out)
    write_outputs(args, ctx, records, alpha, out)
    print(f"results: {out}")


def run_dense(job: dict, args, ctx: dict) -> dict:
    path = os.path.join(args.work, "runs", f"dense-{key(job, ctx)}.json")
    if not os.path.isfile(path):
        evals = {**ctx["eval"], **ctx["check"]}
        bp.write_json(path, {"method": "dense", "setting": "", "perplexity": bp.evaluate(ctx["model"], evals)})
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
