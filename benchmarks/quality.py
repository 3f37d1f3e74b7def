"""Quality benchmark: held-out perplexity of UniPruning vs magnitude, Wanda, RIA and SparseGPT.

    python benchmarks/quality.py                       # the harness's own model, trained on Shakespeare
    python benchmarks/quality.py --model DIR --calib PATH --data PATH --seqlen 2048   # a model of yours

Without --model, a Llama-architecture model (the demo's builder at a larger size, about 7 M parameters,
seeded) is trained on benchmarks/data/shakespeare with the held-out plays removed, and cached; the held-out
plays are never trained or calibrated on. Every method prunes the same model on the same calibration
windows (one `--seed`) and is evaluated on the same held-out text, each run in its own process through
the `unipruning` command line (so its report's peak RSS is its own):

- magnitude, Wanda (per output row, as in its paper) and RIA (per matrix, a = 0.5): the engine with a
  single mirror step over all windows (`--batch-size NSAMPLES`), which ranks exactly by the one-shot score;
- SparseGPT: the engine's `--metric sparsegpt --reconstruct obs` (one run per sparsity);
- UniPruning: stochria and ria metrics with feedback none, and stochria with feedback full (S measured
  along an AdamW fine-tuning trajectory of the whole model), ONE calibration each (at the first setting);
  every other sparsity and pattern, allocation global (unstructured settings) and the `--reconstruct obs`
  variant (stochria) are cut from that saliency by `mask`. The time column gives the calibration run
  and the mean of the masks.

Outputs (in --out, default benchmarks/results): quality.json (every number with its settings), quality.md
(the table) and quality.png (perplexity vs sparsity, log scale; a second panel for N:M).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXTS = os.path.join(ROOT, "benchmarks", "data", "shakespeare")
HELDOUT = ("midsummer_nights_dream", "othello", "twelfth_night")
SETTINGS = ("0.5", "0.6", "0.7", "0.8", "2:4", "4:8")

# name -> (options of its own calibration run, or None; the method whose saliency its masks are cut from
# (itself when it calibrates); options added to each `mask`; the settings it covers)
UNSTRUCTURED = tuple(s for s in SETTINGS if ":" not in s)
METHODS = {
    "magnitude": (["--metric", "magnitude", "--batch-size", "{nsamples}"], "magnitude", [], SETTINGS),
    "wanda": (["--metric", "wanda", "--allocation", "row", "--batch-size", "{nsamples}"], "wanda",
              ["--allocation", "row"], SETTINGS),
    "ria": (["--metric", "ria", "--batch-size", "{nsamples}"], "ria", [], SETTINGS),
    "sparsegpt": (["--metric", "sparsegpt", "--reconstruct", "obs"], None, None, SETTINGS),
    "unipruning stochria layer": (["--metric", "stochria"], "unipruning stochria layer", [], SETTINGS),
    "unipruning ria layer": (["--metric", "ria"], "unipruning ria layer", [], SETTINGS),
    # the saliency does not depend on the allocation: global masks come from the layer runs' saliency
    "unipruning stochria global": (None, "unipruning stochria layer", ["--allocation", "global"], UNSTRUCTURED),
    "unipruning ria global": (None, "unipruning ria layer", ["--allocation", "global"], UNSTRUCTURED),
    "unipruning stochria layer + obs": (None, "unipruning stochria layer",
                                        ["--reconstruct", "obs", "--calib", "{calib}"], SETTINGS),
    "unipruning stochria full layer": (["--metric", "stochria", "--feedback", "full"],
                                       "unipruning stochria full layer", [], SETTINGS),
    "unipruning stochria full global": (None, "unipruning stochria full layer", ["--allocation", "global"],
                                        UNSTRUCTURED),
}
NOT_RUN: dict[str, str] = {}


def quality_recipe():
    from toy_model import TinyLlama

    return TinyLlama(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=6, num_heads=8,
                     seqlen=128, batch_size=16, train_steps=1500, lr=2e-3, seed=0)


def trained_model(text_dir: str) -> str:
    """The harness's model, trained on every text of `text_dir` except the held-out plays (cached)."""
    from toy_model import cached_trained_model

    files = sorted(f for f in os.listdir(text_dir) if f.endswith(".txt") and f != "metadata.txt")
    heldout = [f for f in files if f.removesuffix("_gut.txt").removesuffix(".txt") in HELDOUT]
    if len(heldout) != len(HELDOUT):
        raise SystemExit(f"quality: {text_dir} lacks some held-out plays {HELDOUT}")

    def read(names):
        return [open(os.path.join(text_dir, n), encoding="utf-8").read() for n in names]

    return cached_trained_model(quality_recipe(), read([f for f in files if f not in heldout]), read(heldout),
                                "quality-llama", "the quality benchmark's model (about 10 minutes on 2 CPU cores)")


def _setting_options(setting: str) -> list[str]:
    return ["--pattern", setting] if ":" in setting else ["--sparsity", setting]


def _run(args: list[str]) -> None:
    """`python -m unipruning ARGS` in its own process (so that each run's peak memory is its own)."""
    done = subprocess.run([sys.executable, "-m", "unipruning", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"quality: `unipruning {' '.join(args)}` failed:\n{done.stderr.strip()}")


def _cli(args: list[str]) -> dict:
    """Run `unipruning ARGS` (_run); its report (pruning_report.json of --out)."""
    start = time.perf_counter()
    _run(args)
    out = args[args.index("--out") + 1]
    with open(os.path.join(out, "pruning_report.json")) as f:
        report = json.load(f)
    report["process_seconds"] = time.perf_counter() - start
    return report


def _perplexity(model_dir: str, data: str, seqlen: int, device: str) -> float:
    from unipruning.config import EvalOptions
    from unipruning.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(model_dir, data, seqlen, EvalOptions(device=device))["perplexity"]


def run(args) -> dict:
    model = args.model or trained_model(args.texts)
    calib = args.calib or os.path.join(model, "texts", "train.txt")
    data = args.data or os.path.join(model, "texts", "heldout.txt")
    common = ["--model", model, "--device", args.device]
    calib_opts = ["--calib", calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                  "--seed", str(args.seed)]
    rows = []
    dense = _perplexity(model, data, args.seqlen, args.device)
    print(f"dense: {dense:.3f}", flush=True)
    work = tempfile.mkdtemp(prefix="unipruning-quality-", dir=args.work)
    saliency: dict[str, str] = {}  # method -> the saliency/ of its calibration run
    try:
        for method in args.methods:
            own, source, mask_options, covered = METHODS[method]
            if own is None and source not in saliency:
                raise SystemExit(f"quality: {method!r} needs {source!r} to run first (keep the default order)")
            for setting in [s for s in args.settings if s in covered]:
                out = os.path.join(work, f"{method.replace(' ', '_')}-{setting.replace(':', 'of')}")
                if own is not None and (source is None or method not in saliency):
                    options = [o.format(nsamples=args.nsamples) for o in own]
                    report = _cli(["prune", *common, "--out", out, *calib_opts, *options, *_setting_options(setting)])
                    if source is not None:
                        saliency[method] = os.path.join(out, "saliency")
                else:
                    options = [o.format(calib=calib) for o in mask_options]
                    if ":" in setting and "--allocation" in options:  # N:M masks are per group, never global/row
                        options = options[2:]
                    report = _cli(["mask", *common, "--saliency", saliency[source], "--out", out,
                                   *_setting_options(setting), *options])
                ppl = _perplexity(out, data, args.seqlen, args.device)
                rows.append({
                    "method": method, "setting": setting, "perplexity": ppl,
                    "sparsity": report["total"]["sparsity"], "seconds": report["wall_seconds"],
                    "made_by": report["command"] + ("" if report["command"] == "prune" else f" from {source}"),
                    "peak_rss_bytes": report["peak_memory"]["cpu_max_rss_bytes"],
                    "peak_gpu_bytes": report["peak_memory"]["gpu_max_allocated_bytes"],
                    "reconstruction_seconds": report.get("reconstruction", {}).get("seconds"),
                })
                print(f"{method:<32} {setting:>4}: {ppl:9.3f}  ({report['wall_seconds']:.1f} s)", flush=True)
                if not (saliency.get(method, "").startswith(out + os.sep)):
                    shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"dense_perplexity": dense, "rows": rows, "model": model, "calib": calib, "data": data}


def _times(runs: list[dict]) -> str:
    """Seconds per run: 'prune X' for calibration runs (mean), 'mask Y' for masks cut from a saliency."""
    parts = []
    for kind in ("prune", "mask"):
        secs = [r["seconds"] for r in runs if r["made_by"].startswith(kind)]
        if secs:
            parts.append(f"{kind} {sum(secs) / len(secs):.1f}" + (f" (x{len(secs)})" if len(secs) > 1 else ""))
    return ", ".join(parts)


def table(result: dict, settings: list[str]) -> str:
    by = {(r["method"], r["setting"]): r for r in result["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    head = ["method", *settings, "seconds per run", "peak RSS (GiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| dense | " + " | ".join(f"{result['dense_perplexity']:.2f}" for _ in settings) + " | | |")
    for method in methods:
        cells = [f"{by[(method, s)]['perplexity']:.2f}" if (method, s) in by else "" for s in settings]
        runs = [by[(method, s)] for s in settings if (method, s) in by]
        rss = max(r["peak_rss_bytes"] for r in runs) / 2**30
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_times(runs)} | {rss:.2f} |")
    for method, why in NOT_RUN.items():
        lines.append(f"| {method} | " + " | ".join("not run" for _ in settings) + f" | {why} | |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for i, method in enumerate(methods):
        color = f"C{i % 10}"  # one colour per method in both panels
        rows = [r for r in result["rows"] if r["method"] == method]
        unstructured = [(float(r["setting"]), r["perplexity"]) for r in rows if ":" not in r["setting"]]
        nm = [(r["setting"], r["perplexity"]) for r in rows if ":" in r["setting"]]
        style = "-" if method.startswith("unipruning") else "--"
        if unstructured:
            left.plot(*zip(*unstructured, strict=True), style, marker="o", color=color, label=method)
        if nm:
            right.plot(*zip(*nm, strict=True), style, marker="o", color=color, label=method)
    for ax, title in ((left, "unstructured"), (right, "N:M")):
        ax.axhline(result["dense_perplexity"], color="black", linewidth=0.8, linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel("held-out perplexity (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_xlabel("sparsity")
    right.set_xlabel("pattern")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a local Hugging Face model directory (default: train the harness's model)")
    p.add_argument("--calib", help="calibration text (default: the training plays of the harness's model)")
    p.add_argument("--data", help="held-out evaluation text (default: the held-out plays)")
    p.add_argument("--texts", default=DEFAULT_TEXTS, help="texts to train the harness's model on")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=128, help="calibration and evaluation window (2048 for real LLMs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="SETTING")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--work", default=None, help="scratch directory for the pruned checkpoints")
    args = p.parse_args(argv)
    if (args.calib is None or args.data is None) and args.model is not None:
        p.error("--model needs --calib and --data")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    result = run(args)
    import torch

    import unipruning

    result.update({
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else
        f"cpu ({os.cpu_count()} cores)",
        "versions": {"unipruning": unipruning.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "settings": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                     "heldout_plays": list(HELDOUT) if args.model is None else None,
                     "recipe": dataclasses.asdict(quality_recipe()) if args.model is None else None},
        "not_run": NOT_RUN,
        "total_seconds": time.perf_counter() - start,
    })
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(result, f, indent=1)
    markdown = table(result, args.settings)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(markdown)
    plot(result, os.path.join(args.out, "quality.png"))
    print(markdown)


if __name__ == "__main__":
    main()
