"""Golden outputs: every job's bytes, hashed, against hashes recorded from an earlier version.

A refactoring must not change a single output byte: prune (every metric, allocation and pattern),
mask (layer, row, global, N:M, with reconstruction), feedback full, targeting, SparseGPT, packing, the
families with fused and expert matrices, a run killed and resumed, and torchrun. Each case hashes the
weight shards and index, config.json, the saliency directory and the report (with timings, memory,
versions and temporary paths left out) of the tiny seeded checkpoints below.

The hashes depend on floating-point rounding of the CPU kernels (torch version and vector ISA), so they
are recorded per (torch version, CPU capability): on another combination the cases skip with the
reason. tests/conftest.py pins torch to its AVX2 kernels on every x86 machine that has them
(ATEN_CPU_CAPABILITY), so AVX2 and AVX512 machines check the same hashes. The thread count changes the
order of parallel reductions (the OBS Hessians, expert routing): the module runs every case with 2 threads,
in process and in the processes it starts.
`UNIPRUNING_GOLDEN=write python -m pytest tests/test_golden.py` records the hashes of the code
as it is (only when an output is meant to change: say so in the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests._utils import make_checkpoint, make_family_checkpoint
from unipruning.cli import main

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "outputs.json")
WRITE = os.environ.get("UNIPRUNING_GOLDEN") == "write"
VOLATILE = {"seconds", "write_seconds", "wall_seconds", "calibration_seconds", "open_seconds", "cut_seconds",
            "peak_memory", "versions", "git_hash"}
CALIB = ["--nsamples", "8", "--seqlen", "32"]
BASETEMP: list = []  # pytest's temporary root: paths below it are left out of the report's hash


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(2)
    os.environ["OMP_NUM_THREADS"] = "2"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env


def _platform() -> str:
    return f"torch {torch.__version__.split('+')[0]} / {torch.backends.cpu.get_cpu_capability()}"


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def output_hashes(directory) -> dict[str, str]:
    """{'files': sha256 of every output byte but the report, 'report': sha256 of the stable report}."""
    files = hashlib.sha256()
    for root, _, names in sorted(os.walk(directory)):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel in ("pruning_report.json", "packing_report.json"):
                continue
            files.update(rel.encode() + b"\0")
            with open(path, "rb") as f:
                files.update(f.read())
    hashes = {"files": files.hexdigest()}
    for report in ("pruning_report.json", "packing_report.json"):
        path = os.path.join(directory, report)
        if os.path.isfile(path):
            with open(path) as f:
                text = f.read().replace(str(BASETEMP[0]), "<tmp>")
            stable = json.dumps(_strip(json.loads(text)), sort_keys=True)
            hashes[report.split("_")[0]] = hashlib.sha256(stable.encode()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    BASETEMP[:] = [tmp_path_factory.getbasetemp()]
    recorded = {}
    if os.path.isfile(GOLDEN):
        with open(GOLDEN) as f:
            recorded = json.load(f)
    if WRITE:
        recorded.setdefault(_platform(), {})
        yield recorded[_platform()]
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(recorded, f, indent=1, sort_keys=True)
            f.write("\n")
        return
    if _platform() not in recorded:
        pytest.skip(f"golden hashes were recorded for {sorted(recorded)}; this machine is {_platform()}")
    yield recorded[_platform()]


def check(golden, case: str, directory) -> None:
    hashes = output_hashes(directory)
    if WRITE:
        golden[case] = hashes
        return
    assert case in golden, f"no golden hashes for {case}"
    assert hashes == golden[case], f"{case}: outputs differ from the recorded ones"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden_models")
    return {
        "llama": make_checkpoint(root / "llama", layers=2, seed=3),
        "tied_bf16": make_checkpoint(root / "tied", dtype=torch.bfloat16, tie=True, layers=2, seed=4),
        "phi3": make_family_checkpoint(root / "phi3", "phi3", seed=5),
        "mixtral": make_family_checkpoint(root / "mixtral", "mixtral", seed=6),
    }


PRUNE_CASES = {
    "prune-default": ("llama", []),
    "prune-ria-row": ("llama", ["--metric", "ria", "--allocation", "row", "--sparsity", "0.6"]),
    "prune-wanda-4of8": ("llama", ["--metric", "wanda", "--pattern", "4:8"]),
    "prune-magnitude-global": ("llama", ["--metric", "magnitude", "--allocation", "global", "--sparsity", "0.7"]),
    "prune-batch2": ("llama", ["--batch-size", "2", "--sparsity", "0.6"]),
    "prune-obs": ("llama", ["--reconstruct", "obs", "--sparsity", "0.6"]),
    "prune-sparsegpt-2of4": ("llama", ["--metric", "sparsegpt", "--reconstruct", "obs", "--pattern", "2:4"]),
    "prune-feedback-full": ("llama", ["--feedback", "full", "--batch-size", "2", "--sparsity", "0.6"]),
    "prune-targeting": ("llama", ["--ignore", "o_proj", "--dense-layers", "0", "--sparsity", "0.6"]),
    "prune-tied-bf16": ("tied_bf16", ["--sparsity", "0.6"]),
    "prune-phi3": ("phi3", ["--pattern", "2:4"]),
    "prune-mixtral": ("mixtral", ["--sparsity", "0.6"]),
}
MASK_CASES = {
    "mask-layer-70": ["--sparsity", "0.7"],
    "mask-row-60": ["--allocation", "row", "--sparsity", "0.6"],
    "mask-global-bounds": ["--allocation", "global", "--sparsity", "0.6", "--bounds", "0.1", "0.9"],
    "mask-2of4": ["--pattern", "2:4"],
    "mask-obs-70": ["--sparsity", "0.7", "--reconstruct", "obs", "--calib", "{calib}"],
}


@pytest.mark.parametrize("case", sorted(PRUNE_CASES))
def test_prune_outputs_are_unchanged(case, models, text_file, golden, tmp_path):
    model, extra = PRUNE_CASES[case]
    out = tmp_path / "out"
    assert main(["prune", "--model", models[model], "--out", str(out), "--calib", text_file, *CALIB, *extra]) == 0
    check(golden, case, out)


@pytest.fixture(scope="module")
def default_saliency(models, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("golden_saliency") / "pruned"
    assert main(["prune", "--model", models["llama"], "--out", str(out), "--calib", text_file, *CALIB]) == 0
    return str(out / "saliency")


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_mask_outputs_are_unchanged(case, models, text_file, default_saliency, golden, tmp_path):
    extra = [a.replace("{calib}", text_file) for a in MASK_CASES[case]]
    out = tmp_path / "out"
    assert main(["mask", "--model", models["llama"], "--saliency", default_saliency, "--out", str(out),
                 *extra]) == 0
    check(golden, case, out)


def test_recipe_and_pack_outputs_are_unchanged(models, text_file, golden, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("ignore: ['layers\\.1\\.self_attn\\.q_proj']\noverrides:\n"
                      "  - {match: 'mlp\\.', pattern: '2:4'}\n  - {match: 'self_attn\\.', sparsity: 0.4}\n")
    out = tmp_path / "recipe-out"
    assert main(["prune", "--model", models["llama"], "--out", str(out), "--calib", text_file, *CALIB,
                 "--recipe", str(recipe)]) == 0
    check(golden, "prune-recipe", out)
    two_four = tmp_path / "24"
    assert main(["prune", "--model", models["llama"], "--out", str(two_four), "--calib", text_file, *CALIB,
                 "--pattern", "2:4"]) == 0
    packed = tmp_path / "packed"
    assert main(["pack", "--model", str(two_four), "--out", str(packed), "--dtype", "bfloat16"]) == 0
    check(golden, "pack-2of4-bf16", packed)


@pytest.mark.slow  # budget: 40 s on 2 CPU cores (a 4-block prune three times, one of them killed)
def test_killed_and_resumed_run_is_unchanged(text_file, golden, tmp_path):
    source = make_checkpoint(tmp_path / "model", layers=4, hidden=64, intermediate=128, seed=7)
    args = ["prune", "--model", source, "--calib", text_file, "--nsamples", "64", "--seqlen", "64"]
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    check(golden, "prune-4-blocks", reference)
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "unipruning", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed = time.time() + 300, False
    while time.time() < deadline and proc.poll() is None:
        partial = [d for d in os.listdir(tmp_path) if d.startswith(".resumed.partial-")]
        if partial and any(os.path.exists(os.path.join(tmp_path, partial[0], state, "block-00001.safetensors"))
                           for state in (".blocks", ".state/blocks")):
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed, "the run ended before two blocks were done"
    assert main([*args, "--out", str(out)]) == 0
    assert output_hashes(out)["files"] == golden["prune-4-blocks"]["files"]


@pytest.mark.slow  # budget: 40 s on 2 CPU cores (two processes start torch and transformers)
def test_torchrun_outputs_are_unchanged(models, text_file, golden, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unipruning",
         "prune", "--model", models["llama"], "--out", str(out), "--calib", text_file, "--device", "cpu", *CALIB,
         "--batch-size", "2", "--sparsity", "0.6"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the same bytes as one process with the same --batch-size (prune-batch2)
    assert output_hashes(out)["files"] == golden["prune-batch2"]["files"]
