"""unipruning against llm-compressor (Wanda, SparseGPT) on a real model, on the same calibration windows.

    pip install -e '.[bench]'
    nice -n 10 python benchmarks/bench_peers.py --methods llmc-wanda llmc-sparsegpt unipruning-ria \
        --nsamples 64 --seqlen 512          # results in benchmarks/results/peers-<device>.json
    python benchmarks/bench_peers.py --quick   # the harness end to end at tiny sizes (2 blocks, 4 x 64)

Model: `--model DIR`, by default SmolLM2-135M-Instruct dequantized to float32 (benchmarks/smollm2.py);
`--layers N` keeps its first N decoder blocks. Texts (benchmarks/texts.py): calibration on the
`--calib` domain's calibration documents, held-out perplexity on the held-out documents of every domain.

The windows are drawn once by `unipruning.data.calibration_windows` (the model's tokenizer, `--seed`,
`--nsamples` x `--seqlen`) and saved; `unipruning prune` draws them again from the same text with the
same arguments (its report's windows sha256 is checked against ours) and llm-compressor's runner reads
the saved file. Each method runs as its own process under benchmarks/peers/vmhwm.py, which reports the
process's own peak RSS (VmHWM); the wall time is the whole process's, start-up and saving included.
Every output is evaluated by the same function (`evaluate`) on the same saved evaluation windows, and
its realised sparsity is measured from its safetensors (tensors outside the prunable matrices must equal
the source's). One result file per method and setting in `--work`/runs: a run stopped half-way keeps
the methods that finished, and the same command skips them.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import smollm2  # noqa: E402
import texts  # noqa: E402

PEERS = os.path.join(ROOT, "benchmarks", "peers")
WRAPPER = os.path.join(PEERS, "vmhwm.py")
LLMC_RUNNER = os.path.join(PEERS, "llmc_oneshot.py")

# options of `unipruning prune` per method ({nsamples} is filled in)
OURS = {
    "unipruning": [],  # the defaults: stochria, mask only
    "unipruning-obs": ["--reconstruct", "obs"],
    "unipruning-sparsegpt": ["--metric", "sparsegpt", "--reconstruct", "obs"],
    "unipruning-ria": ["--metric", "ria"],
    # one mirror step over every window, per output row: ranks exactly by Wanda's score (as llm-compressor)
    "unipruning-wanda": ["--metric", "wanda", "--allocation", "row", "--batch-size", "{nsamples}"],
}
PEER = {"llmc-wanda": "wanda", "llmc-sparsegpt": "sparsegpt"}
METHODS = ("dense", *OURS, *PEER)
QUICK = {"nsamples": 4, "seqlen": 64, "layers": 2, "eval_seqlen": 64, "eval_windows": 4}
PRUNABLE = re.compile(r"\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
VERSIONED = ("torch", "transformers", "llmcompressor", "compressed-tensors", "unipruning", "datasets")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, no usage block
        print(f"bench_peers: {message}", file=sys.stderr)
        sys.exit(2)


def _pattern(text: str) -> str:
    if text == "unstructured":
        return text
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise argparse.ArgumentTypeError(f"expected unstructured or N:M with 0 < N < M, got {text!r}")
    return text


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                   help=f"any of {', '.join(METHODS)} (default: all)")
    p.add_argument("--nsamples", type=_positive, default=64)
    p.add_argument("--seqlen", type=_positive, default=512)
    p.add_argument("--sparsity", type=_fraction, default=0.5)
    p.add_argument("--pattern", type=_pattern, default="unstructured", help="unstructured, or N:M (keep N of M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="a Hugging Face model directory (default: the cached SmolLM2-135M)")
    p.add_argument("--layers", type=_positive, help="keep only the first N decoder blocks of the model")
    p.add_argument("--calib", choices=texts.DOMAINS, default="shakespeare", help="calibration text domain")
    p.add_argument("--eval-seqlen", type=_positive, default=512)
    p.add_argument("--eval-windows", type=_positive, help="evaluate on the first N windows of each text only")
    p.add_argument("--out", help="result JSON (default benchmarks/results/peers-<device>.json)")
    p.add_argument("--work", help="checkpoints, windows and per-method results (default: in the cache)")
    p.add_argument("--keep", action="store_true", help="keep the pruned checkpoints in --work")
    p.add_argument("--quick", action="store_true",
                   help=f"test the harness: {', '.join(f'{k}={v}' for k, v in QUICK.items())}, results in --work")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model: {args.model!r} is not a model directory (no config.json)")
    if args.eval_seqlen < 2 or args.seqlen < 2:
        p.error("--seqlen and --eval-seqlen must be at least 2")
    base = os.environ.get("UNIPRUNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unipruning")
    args.work = args.work or os.path.join(base, "bench-peers-quick" if args.quick else "bench-peers")
    return args


def device_name() -> tuple[str, str]:
    """(file tag, description) of the machine the methods compute on."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("nvidia ")).strip("-"), name
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return "cpu", f"{model}, {os.cpu_count()} cores"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_sha256(paths: list[str]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model_dir: str) -> str:
    return file_sha256([os.path.join(model_dir, "config.json"), *glob.glob(os.path.join(model_dir, "*.safetensors"))])


def truncated_model(model_dir: str, layers: int, work: str) -> str:
    """The first `layers` decoder blocks of `model_dir` (the rest dropped), saved once under `work`."""
    out = os.path.join(work, "models", f"{os.path.basename(os.path.normpath(model_dir))}-{layers}-blocks")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    if layers > config.num_hidden_layers:
        raise SystemExit(f"bench_peers: --layers {layers}: the model has {config.num_hidden_layers} blocks")
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    stage = f"{out}.partial-{os.getpid()}"
    model.save_pretrained(stage)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(stage)
    os.replace(stage, out)
    return out


def prepare(args) -> dict:
    """Model, text splits, calibration and evaluation windows (saved under --work), with their hashes."""
    from transformers import AutoTokenizer

    from unipruning.data import calibration_windows, eval_windows, windows_hash

    os.makedirs(args.work, exist_ok=True)
    model = args.model or smollm2.converted_model()
    if args.layers:
        model = truncated_model(model, args.layers, args.work)
    splits = {d: texts.write_split(d) for d in texts.DOMAINS}
    tokenizer = AutoTokenizer.from_pretrained(model)
    windows = calibration_windows(tokenizer, splits[args.calib].calib, args.nsamples, args.seqlen, args.seed)
    sha = windows_hash(windows)
    windows_path = os.path.join(args.work, f"windows-{sha[:16]}.pt")
    save_windows(windows, windows_path)
    evals = {}
    for domain, split in splits.items():
        ids = eval_windows(tokenizer, split.heldout, args.eval_seqlen)[: args.eval_windows]
        path = os.path.join(args.work, f"eval-{domain}-{windows_hash(ids)[:16]}.pt")
        save_windows(ids, path)
        evals[domain] = {"path": path, "sha256": windows_hash(ids), "windows": ids.shape[0], "seqlen": ids.shape[1],
                         "text": split.heldout}
    return {"model": model, "model_sha256": model_fingerprint(model), "calib": splits[args.calib].calib,
            "windows": {"path": windows_path, "sha256": sha, "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "seed": args.seed, "domain": args.calib},
            "eval": evals, "texts": {d: s.manifest for d, s in splits.items()}}


def _setting_options(args) -> list[str]:
    return ["--pattern", args.pattern] if args.pattern != "unstructured" else ["--sparsity", str(args.sparsity)]


def command(method: str, args, ctx: dict, out: str) -> list[str]:
    """The target of the wrapper (`-m unipruning ...` or the runner script) that writes `out`."""
    if method in PEER:
        return [LLMC_RUNNER, "--model", ctx["model"], "--windows", ctx["windows"]["path"], "--out", out,
                "--method", PEER[method], "--sparsity", str(args.sparsity), "--pattern", args.pattern]
    options = [o.format(nsamples=args.nsamples) for o in OURS[method]]
    if args.pattern != "unstructured" and "--allocation" in options:  # N:M masks are per group of M
        i = options.index("--allocation")
        options = options[:i] + options[i + 2:]
    return ["-m", "unipruning", "prune", "--model", ctx["model"], "--out", out, "--calib", ctx["calib"],
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
            *_setting_options(args), *options]


def run_key(method: str, args, ctx: dict) -> str:
    """What a result depends on: a result file with this key is reused."""
    spec = {"method": method, "model": ctx["model_sha256"], "eval": {d: e["sha256"] for d, e in ctx["eval"].items()}}
    if method != "dense":
        spec.update({"windows": ctx["windows"]["sha256"], "sparsity": args.sparsity, "pattern": args.pattern,
                     "options": OURS.get(method, PEER.get(method))})
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def result_path(work: str, method: str, args, key: str) -> str:
    if method == "dense":
        tag = "dense"
    else:
        setting = args.pattern.replace(":", "of") if args.pattern != "unstructured" else f"s{args.sparsity}"
        tag = f"{method}-{setting}-{args.nsamples}x{args.seqlen}"
    return os.path.join(work, "runs", f"{tag}-{key[:12]}.json")


def _atomically(path: str, write) -> None:
    """write(temporary name), then rename it to `path`: a reader (or a resumed run) never sees half a file.
    The temporary is this process's own (not io.staging's fixed name): two benchmarks sharing a --work may
    write the same content-named file at once."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_windows(ids, path: str) -> None:
    import torch

    _atomically(path, lambda tmp: torch.save(ids, tmp))


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)

    _atomically(path, dump)


def measured(target: list[str], log_dir: str, name: str) -> dict:
    """Run `python vmhwm.py REPORT TARGET...`: the process's wall seconds and its own VmHWM."""
    os.makedirs(log_dir, exist_ok=True)
    report, log = os.path.join(log_dir, f"{name}.rss.json"), os.path.join(log_dir, f"{name}.log")
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, WRAPPER, report, *target], stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{name} failed with exit code {done.returncode} (log {log}):\n{tail}")
    with open(report) as f:
        rss = json.load(f)
    return {"wall_seconds": wall, "peak_rss_bytes": rss["vmhwm_bytes"], "log": log}


def evaluate(model_dir: str, evals: dict, batch_size: int = 8) -> dict:
    """Held-out perplexity of a checkpoint on every saved evaluation set: one function for all methods."""
    import torch
    from transformers import AutoModelForCausalLM

    from unipruning.evaluate import perplexity

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    return {d: perplexity(model, torch.load(e["path"]), device, batch_size) for d, e in evals.items()}


def _tensor_files(model_dir: str) -> dict[str, str]:
    from safetensors import safe_open

    names = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            names.update(dict.fromkeys(f.keys(), path))
    return names


def _tensor(path: str, name: str):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.get_tensor(name)


def _nm_valid(weight, pattern: str) -> bool:
    keep, m = (int(v) for v in pattern.split(":"))
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, m) != 0).sum(-1) <= keep).all())


def realised_sparsity(model_dir: str, source_dir: str, pattern: str = "unstructured") -> dict:
    """Zeros of every prunable matrix of the output; every other tensor compared with the source's."""
    import torch

    out, src = _tensor_files(model_dir), _tensor_files(source_dir)
    per, changed, zeros, total, nm_ok = {}, [], 0, 0, True
    for name, path in sorted(out.items()):
        t = _tensor(path, name)
        if PRUNABLE.search(name):
            z = int((t == 0).sum())
            per[name] = z / t.numel()
            zeros, total = zeros + z, total + t.numel()
            if pattern != "unstructured":
                nm_ok &= _nm_valid(t, pattern)
        elif name not in src or not torch.equal(t, _tensor(src[name], name)):
            changed.append(name)
    return {"total": zeros / total if total else None, "matrices": len(per),
            "min": min(per.values(), default=None), "max": max(per.values(), default=None),
            "nm_valid": nm_ok if pattern != "unstructured" else None,
            "other_tensors_changed": changed, "missing_tensors": sorted(set(src) - set(out))}


def run_method(method: str, args, ctx: dict) -> dict:
    """Prune (in its own measured process), evaluate, check; the per-method record."""
    name = os.path.basename(result_path(args.work, method, args, run_key(method, args, ctx)))[:-5]
    record = {"method": method, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if method == "dense":
        model_dir = ctx["model"]
    else:
        model_dir = os.path.join(args.work, "ckpt", name)
        shutil.rmtree(model_dir, ignore_errors=True)
        target = command(method, args, ctx, model_dir)
        record.update({"sparsity": args.sparsity, "pattern": args.pattern, "nsamples": args.nsamples,
                       "seqlen": args.seqlen, "seed": args.seed, "windows_sha256": ctx["windows"]["sha256"],
                       "command": " ".join([sys.executable, WRAPPER, "REPORT", *target])})
        record.update(measured(target, os.path.join(args.work, "logs"), name))
        record.update(_own_report(method, model_dir, ctx))
    record["perplexity"] = evaluate(model_dir, ctx["eval"])
    record["realised_sparsity"] = realised_sparsity(model_dir, ctx["model"], args.pattern if method != "dense"
                                                    else "unstructured")
    if model_dir != ctx["model"] and not args.keep:
        shutil.rmtree(model_dir)
    return record


def _own_report(method: str, model_dir: str, ctx: dict) -> dict:
    """What the method itself reports: unipruning's pruning_report.json (its windows must be ours)."""
    if method in PEER:
        with open(os.path.join(model_dir, "llmc_settings.json")) as f:
            return {"llmc_settings": json.load(f)}
    with open(os.path.join(model_dir, "pruning_report.json")) as f:
        report = json.load(f)
    drawn = report["calibration"]["windows_sha256"]
    if drawn != ctx["windows"]["sha256"]:
        raise RuntimeError(f"{method}: unipruning drew windows {drawn}, not the benchmark's {ctx['windows']['sha256']}")
    return {"own_report": {"wall_seconds": report.get("wall_seconds"), "peak_memory": report.get("peak_memory"),
                           "reconstruction": report.get("reconstruction"), "total": report.get("total")}}


def summary(args, ctx: dict, device: tuple[str, str]) -> dict:
    records = []
    for path in sorted(glob.glob(os.path.join(args.work, "runs", "*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    return {"device": device[1], "date": datetime.date.today().isoformat(), "versions": versions(),
            "model": {"path": ctx["model"], "sha256": ctx["model_sha256"], "conversion": _conversion(ctx["model"])},
            "calibration": ctx["windows"], "eval": ctx["eval"], "texts": ctx["texts"], "results": records}


def _conversion(model_dir: str):
    path = os.path.join(model_dir, "conversion.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def table(records: list[dict]) -> str:
    domains = sorted({d for r in records for d in r["perplexity"]})
    lines = ["| method | setting | windows | " + " | ".join(f"ppl {d}" for d in domains)
             + " | wall s | peak RSS GiB | sparsity |", "|---" * (6 + len(domains)) + "|"]
    for r in records:
        setting = "" if r["method"] == "dense" else (r["pattern"] if r["pattern"] != "unstructured" else r["sparsity"])
        windows = "" if r["method"] == "dense" else f"{r['nsamples']}x{r['seqlen']}"
        wall = f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else ""
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f}" if "peak_rss_bytes" in r else ""
        ppl = " | ".join(f"{r['perplexity'][d]:.2f}" for d in domains)
        lines.append(f"| {r['method']} | {setting} | {windows} | {ppl} | {wall} | {rss} | "
                     f"{r['realised_sparsity']['total']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = device_name()
    out = args.out or (os.path.join(args.work, f"peers-{device[0]}.json") if args.quick else
                       os.path.join(ROOT, "benchmarks", "results", f"peers-{device[0]}.json"))
    ctx = prepare(args)
    for method in args.methods:
        path = result_path(args.work, method, args, run_key(method, args, ctx))
        if os.path.isfile(path):
            print(f"{method}: done before ({path})", flush=True)
            continue
        print(f"{method}: running", flush=True)
        write_json(path, run_method(method, args, ctx))
        write_json(out, summary(args, ctx, device))
    result = summary(args, ctx, device)
    write_json(out, result)
    print(table(result["results"]))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
