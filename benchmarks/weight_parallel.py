"""Two processes against one on the whole `--preset quality` command (issue 27), side by side in one run.

    python benchmarks/weight_parallel.py --repeats 2      # SmolLM2-135M, the quality_smollm2 protocol's windows

Each repeat starts both commands at the same moment, one thread per process: `unipruning prune --preset
quality` in one process, and the same command under `torchrun --nproc_per_node 2` (data-parallel
calibration, weight-parallel OBS pass). Both use --batch-size 2 (two processes split each step's windows;
one process needs the same batch size for the same result): the outputs are compared byte for byte. Wall
time is the whole command's, process start to exit; the load average is sampled every 10 s, because the
machine is shared and what the two runs compete with is part of the result.

Output: weight-parallel-smollm2-<device>.json and .md in benchmarks/results.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import smollm2  # noqa: E402
import texts  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--work", default=None, help="outputs of the runs (default: a directory in the cache)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "weight-parallel-smollm2-cpu.json"))
    return p.parse_args(argv)


def command(args, model: str, calib: str, out: str, processes: int) -> list[str]:
    prune = ["-m", "unipruning", "prune", "--model", model, "--out", out, "--calib", calib, "--nsamples",
             str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0", "--sparsity", args.sparsity,
             "--preset", "quality", "--batch-size", "2", "--device", "cpu"]
    if processes == 1:
        return [sys.executable, *prune]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *prune]


def output_digest(directory: str) -> str:
    """sha256 over every output file but the report (timings, process count)."""
    digest = hashlib.sha256()
    for root, _, names in sorted(os.walk(directory)):
        for name in sorted(names):
            if name != "pruning_report.json":
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, directory).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def side_by_side(args, model: str, calib: str, work: str, repeat: int) -> dict:
    """One repeat: both commands started together; their wall times, report timings, digests and the load."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs, procs = {}, {}
    for processes in (1, 2):
        out = os.path.join(work, f"r{repeat}-p{processes}")
        shutil.rmtree(out, ignore_errors=True)
        runs[processes] = {"cmd": command(args, model, calib, out, processes), "out": out, "start": time.time()}
        procs[processes] = subprocess.Popen(runs[processes]["cmd"], env=env, cwd=work, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)
    load = []
    while any(p.poll() is None for p in procs.values()):
        load.append(os.getloadavg()[0])
        for processes, p in procs.items():
            if p.poll() is not None and "seconds" not in runs[processes]:
                runs[processes]["seconds"] = time.time() - runs[processes]["start"]
        time.sleep(10)
    result = {"load_average_1min": {"min": min(load), "max": max(load), "mean": sum(load) / len(load)}}
    for processes, p in procs.items():
        run = runs[processes]
        run.setdefault("seconds", time.time() - run["start"])
        assert p.returncode == 0, p.stderr.read()[-3000:]
        with open(os.path.join(run["out"], "pruning_report.json")) as f:
            report = json.load(f)
        result[f"{processes}p"] = {"wall_seconds": round(run["seconds"], 1), "command": " ".join(run["cmd"]),
                                   "calibration_seconds": round(report["calibration_seconds"], 1),
                                   "reconstruction_seconds": round(report["reconstruction"]["seconds"], 1),
                                   "outputs_sha256": output_digest(run["out"])}
    result["ratio"] = round(result["2p"]["wall_seconds"] / result["1p"]["wall_seconds"], 3)
    result["same_bytes"] = result["1p"]["outputs_sha256"] == result["2p"]["outputs_sha256"]
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    model = smollm2.converted_model()
    calib = texts.write_split("shakespeare").calib
    work = args.work or os.path.join(texts.cache_root(), "bench-weight-parallel")
    os.makedirs(work, exist_ok=True)
    repeats = []
    for repeat in range(args.repeats):
        repeats.append(side_by_side(args, model, calib, work, repeat))
        print(json.dumps(repeats[-1]), flush=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
              "date": datetime.date.today().isoformat(), "model": model, "calib": calib,
              "nsamples": args.nsamples, "seqlen": args.seqlen, "sparsity": args.sparsity, "repeats": repeats,
              "ratio_mean": round(sum(r["ratio"] for r in repeats) / len(repeats), 3)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    rows = ["| repeat | 1 process s | 2 processes s | ratio | same bytes | load (1 min avg, min-max) |",
            "|---|---|---|---|---|---|"]
    for i, r in enumerate(repeats):
        rows.append(f"| {i} | {r['1p']['wall_seconds']} | {r['2p']['wall_seconds']} | {r['ratio']} | "
                    f"{r['same_bytes']} | {r['load_average_1min']['min']:.1f}-{r['load_average_1min']['max']:.1f} |")
    with open(args.out[:-5] + ".md", "w") as f:
        f.write(f"SmolLM2-135M, --preset quality --sparsity {args.sparsity}, {args.nsamples} x {args.seqlen} windows, "
                f"--batch-size 2, one thread per process, both commands started together; {result['machine']}, "
                f"{result['date']}.\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
