"""End-to-end `unipruning prune` on checkpoints with real Llama-2-7B / 70B layer shapes (random bf16
weights written to local disk, a few decoder layers: a whole 70B checkpoint does not fit the GPU
machine's disk): wall time, time per layer, disk read time (measured separately), peak CPU RSS and GPU
memory, and the extrapolation to all of the model's layers, stated as such.

    python benchmarks/bench_e2e.py --shape 70b --layers 3                      # on the GPU machine
    python benchmarks/bench_e2e.py --shape 7b --layers 2 --nsamples 8 --seqlen 512 --device cpu

Writes benchmarks/results/e2e-<device>.json (or --out). A script, not a pytest module: it needs minutes
and tens of GB of disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = os.path.join(ROOT, "benchmarks", "data", "shakespeare")
SHAPES = {  # Llama-2: hidden, MLP, heads, kv heads, layers of the real model
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, layers=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, layers=80),
}


def write_checkpoint(directory: str, shape: str, layers: int, texts: list[str]) -> None:
    """A Llama checkpoint of `layers` decoder layers with the shape's dimensions, random bf16 weights
    (std 0.02), one safetensors shard per layer plus one for the rest, and a BPE tokenizer."""
    from safetensors.torch import save_file
    from toy_model import train_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    dims = dict(SHAPES[shape])
    dims.pop("layers")
    tokenizer = train_tokenizer(texts, 32000)
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=1, dtype="bfloat16", **dims)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    weight_map: dict[str, str] = {}
    gen = torch.Generator().manual_seed(0)
    for name, param in skeleton.named_parameters():
        parts = name.split(".")
        shard = f"model-layer-{int(parts[2]):05d}.safetensors" if parts[1] == "layers" else "model-rest.safetensors"
        value = torch.ones(param.shape) if "norm" in name else torch.randn(param.shape, generator=gen) * 0.02
        shards.setdefault(shard, {})[name] = value.to(torch.bfloat16)
        weight_map[name] = shard
        if len(shards[shard]) == 9 and shard != "model-rest.safetensors":  # a layer is complete: write it
            save_file(shards.pop(shard), os.path.join(directory, shard), metadata={"format": "pt"})
    for shard, tensors in shards.items():
        save_file(tensors, os.path.join(directory, shard), metadata={"format": "pt"})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f)
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def drop_page_cache() -> bool:
    """Ask the kernel to drop clean cached pages (root only), so that reads come from the disk."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_read_seconds(directory: str, layers: int) -> tuple[list[float], bool]:
    """Seconds to read each decoder layer's tensors from the shards into memory (every byte touched, as
    the engine's copy into the layer does), and whether the page cache was dropped first."""
    from unipruning.io.checkpoint import LazyCheckpoint, load_config

    checkpoint = LazyCheckpoint(directory, load_config(directory))
    dropped = drop_page_cache()
    seconds = []
    for i in range(layers):
        names = [n for n in checkpoint.shard_of if n.startswith(f"model.layers.{i}.")]
        start = time.perf_counter()
        tensors = {n: t.clone() for n, t in checkpoint.read(names).items()}  # a mapped tensor is read on touch
        seconds.append(time.perf_counter() - start)
        del tensors
    return seconds, dropped


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--metric", default="stochria")
    p.add_argument("--offload-activations", default="auto", choices=("auto", "always", "never"),
                   help="'always' measures the pinned-memory path (transfers overlapped with compute)")
    p.add_argument("--work", default=None, help="scratch directory (needs about 1.8 GB per 70B layer)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    texts = [open(os.path.join(TEXTS, f), encoding="utf-8").read() for f in sorted(os.listdir(TEXTS))
             if f.endswith("_gut.txt")]
    with tempfile.TemporaryDirectory(dir=args.work, prefix="unipruning-e2e-") as work:
        model = os.path.join(work, "model")
        os.makedirs(model)
        start = time.perf_counter()
        write_checkpoint(model, args.shape, args.layers, texts)
        write_seconds = time.perf_counter() - start
        calib = os.path.join(work, "calib.txt")
        with open(calib, "w", encoding="utf-8") as f:
            f.write("\n\n".join(texts))
        reads, cold = disk_read_seconds(model, args.layers)
        drop_page_cache()
        out = os.path.join(work, "pruned")
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "unipruning", "prune", "--model", model, "--out", out, "--calib", calib,
             "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", device,
             "--metric", args.metric, "--offload-activations", args.offload_activations],
            capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        with open(os.path.join(out, "pruning_report.json")) as f:
            report = json.load(f)
    # per layer: read from the shards + calibration ("seconds"), then its pruned shard written as soon as it
    # is done ("write_seconds", layer/row/N:M masks; absent when the weights are written after calibration)
    per_layer = [b["seconds"] for b in report["blocks"]]
    writes = [b.get("write_seconds", 0.0) for b in report["blocks"]]
    layer_total = [c + w for c, w in zip(per_layer, writes, strict=True)]
    steady = layer_total[1:] or layer_total  # the first layer carries one-off kernel compilation
    total_layers = SHAPES[args.shape]["layers"]
    setup = report["calibration_seconds"] - sum(layer_total)  # loading, tokenizing, capturing layer 0's inputs
    finish = report["wall_seconds"] - report["calibration_seconds"]  # the rest of the shards, index, config
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "unipruning": __import__("unipruning").__version__},
        "shape": args.shape, "layers_written": args.layers, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "metric": args.metric, "offload_activations": args.offload_activations,
        "checkpoint_write_seconds": write_seconds,
        "prune_process_seconds": wall, "prune_report_wall_seconds": report["wall_seconds"],
        "weights_written": report["weights_written"],
        "calibration_seconds_per_layer": per_layer, "write_seconds_per_layer": writes,
        "disk_read_seconds_per_layer": reads,
        "disk_reads_cold": cold,  # False: the page cache could not be dropped (reads may come from memory)
        "setup_seconds": setup, "finish_seconds": finish,
        "peak_cpu_rss_bytes": report["peak_memory"]["cpu_max_rss_bytes"],
        "peak_gpu_allocated_bytes": report["peak_memory"]["gpu_max_allocated_bytes"],
        "extrapolation": {
            "note": f"NOT measured: the setup, plus {total_layers} layers x the mean (calibration + write) time "
                    "of the measured layers after the first, plus the finish time per written layer (when the "
                    "weights are written after calibration, that is where the writing is)",
            "layers": total_layers,
            "seconds": setup + total_layers * (sum(steady) / len(steady) + finish / args.layers),
        },
    }
    label = "cpu" if device == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")
    path = args.out or os.path.join(ROOT, "benchmarks", "results", f"e2e-{label}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
