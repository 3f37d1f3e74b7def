"""One prepared run of everything GPU-side, for a lent GPU machine (one H100/H200, minutes of device time):
install (with the CUDA extension when it builds), the `gpu`/`cuda_ext` tests, the compiled OBS kernels,
the 2:4 sparse-linear and packing benchmarks, `prune` of a SmolLM2-shaped model (defaults, offloaded
activations, `--reconstruct obs`), torchrun with NCCL, `bench_e2e.py --shape 70b`, the kernel benchmarks.

    python benchmarks/gpu_check.py --out DIR [--git-hash HASH]    # on the GPU machine
    python benchmarks/gpu_check.py --dry-run                       # anywhere: the steps, budgets, commands

Every step is a subprocess with its own time budget (killed with its process group when over it), and the
whole run has a deadline after which the remaining steps are skipped; a failed step never stops the rest.
DIR receives at most 8 small JSON files (the device machine returns no more): summary.json (per step:
status, reason, seconds, budget, key figures; the device, versions and git hash), logs.json (each step's
commands and the tail of its output), tests.json, benchmarks.json, prune.json, results.json. Scratch goes
to --work (default: a temporary directory, removed at the end).

This script drives only the CLI, pytest and the benchmark scripts (and torch/transformers/tokenizers for
its own helpers): never unipruning's internal modules. Without a CUDA GPU it prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)
TEXTS = os.path.join(ROOT, "benchmarks", "data", "shakespeare")
HELD_OUT = ("midsummer_nights_dream_gut.txt", "othello_gut.txt", "twelfth_night_gut.txt")  # as quality.py
EXIT_NO_GPU = 2
DEADLINE_S = 420  # the whole run; the device command's own limit (timeout_s) should be about a minute more
MIN_STEP_S = 10  # a step is not started with less than this left before the deadline
LOG_TAIL_BYTES = 96 * 1024
# what the device machine returns from $OUT (device README, Limits)
RETURN_LIMITS = {"files": 8, "file_bytes": 16 << 20, "total_bytes": 64 << 20, "depth": 2}
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
OUT_FILE_BYTES = 4 << 20  # each file written well under the limit
# SmolLM2-135M(-Instruct)'s config.json, the model the benchmarks use; its weights (hundreds of MB) cannot
# travel to the device machine (64 MiB), so the speed figures use random weights of this shape
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.02)
TOKENIZER_VOCAB = 8192
# the budgets assume 2048-token windows; prune's default is now the model's context (4096 for this config)
SEQLEN = "2048"


# ---------------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Command:
    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # added to the step's environment
    stdout: str | None = None  # a file for stdout alone (stderr still goes to the log)

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        line = " ".join(filter(None, [env, shlex.join(self.argv)]))
        return f"{line} > {shlex.quote(self.stdout)}" if self.stdout else line


@dataclasses.dataclass
class Step:
    name: str
    budget_s: float
    what: str
    commands: list[Command]
    needs: list[tuple[str, ...]] = dataclasses.field(default_factory=list)  # each: one of these must be ok
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)  # kind (junit/bench/report/json) -> path
    figures: Callable[[dict[str, Any]], dict] | None = None  # key figures from the loaded artifacts
    skip_reason: str | None = None  # known before running (e.g. no real model for perplexity)
    run_if_failed: str | None = None  # run only when this step did not succeed (a fallback)
    keep_going: bool = False  # run every command even after one failed (they do not depend on each other)


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _pytest(junit: str, *args: str) -> list[str]:
    return _py("-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
               f"--junitxml={junit}", "-o", "junit_family=xunit2", *args)


def cuda_home() -> str | None:
    """CUDA_HOME, else the toolkit holding the nvcc on PATH, else /usr/local/cuda: the first with bin/nvcc and
    include/cuda_runtime.h (an nvcc on PATH may be a wrapper script outside the toolkit)."""
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
                 "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return os.environ.get("CUDA_HOME")


def _install_steps(work: str) -> list[Step]:
    pip = _py("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
              "--disable-pip-version-check", "-e", ROOT)
    home = cuda_home()
    ext_env = {"UNIPRUNING_BUILD_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 8)}
    if home:
        ext_env["CUDA_HOME"] = home
    probe = os.path.join(work, "extension.json")
    check = Command(_py(SCRIPT, "--helper", "ext-probe", probe))
    return [
        Step("install", 120, "pip install -e . with the CUDA extension (unipruning._C); without it if no CUDA_HOME",
             [Command(pip, ext_env), check], artifacts={"json": probe}, figures=_install_figures),
        Step("install-plain", 40, "fallback when the extension build failed: pip install -e . without it",
             [Command(pip, {"UNIPRUNING_BUILD_CUDA": "0"}), check], run_if_failed="install",
             artifacts={"json": probe}, figures=_install_figures),
    ]


def _test_steps(work: str) -> list[Step]:
    installed = ("install", "install-plain")
    gpu_xml, obs_xml = os.path.join(work, "gpu-tests.xml"), os.path.join(work, "obs-kernels.xml")
    aot = os.path.join(work, "aot-device.json")
    return [
        Step("aot-registers", 45, "every Triton variant of the AOT table compiled for this GPU and loaded: the "
             "driver's registers and spills against benchmarks/results/kernels-aot.json",
             [Command(_py(os.path.join(ROOT, "benchmarks", "aot_compile.py"), "--device-check", aot))],
             needs=[installed], artifacts={"json": aot}, figures=_aot_figures),
        Step("gpu-tests", 75, 'every test marked gpu or cuda_ext (sparsify_, load_packed, the extension, bf16, >2^31)',
             [Command(_pytest(gpu_xml, "-m", "gpu or cuda_ext", os.path.join(ROOT, "tests")))],
             needs=[installed], artifacts={"junit": gpu_xml}, figures=_junit_figures),
        Step("obs-kernels", 30, "the Triton OBS kernels (Hessian, column sweep) compiled, against their twins",
             [Command(_pytest(obs_xml, "-m", "not gpu", os.path.join(ROOT, "tests", "kernels", "test_obs.py")))],
             needs=[installed], artifacts={"junit": obs_xml}, figures=_junit_figures),
    ]


def _bench_step(work: str, name: str, budget: float, what: str, files: list[str], select: str | None,
                figures: Callable[[dict[str, Any]], dict]) -> Step:
    raw, summary, xml = (os.path.join(work, f"{name}{suffix}") for suffix in ("-raw.json", ".json", ".xml"))
    paths = [os.path.join(ROOT, "benchmarks", f) for f in files]
    args = [*paths, f"--benchmark-json={raw}", *(["-k", select] if select else [])]
    return Step(name, budget, what,
                [Command(_pytest(xml, *args)), Command(_py(os.path.join(ROOT, "benchmarks", "summarize.py"),
                                                           raw, summary))],
                needs=[("install", "install-plain")], artifacts={"junit": xml, "bench": summary}, figures=figures)


def _fp8_step(work: str) -> Step:
    out = os.path.join(work, "fp8-24.json")
    return Step("fp8-24", 50, "FP8 + 2:4 (torchao) against bf16 dense, bf16 2:4 and FP8 dense: 70B linears at "
                "128/2048/8192 tokens and a 4-layer prefill (a 9.x GPU)",
                [Command(_py(os.path.join(ROOT, "benchmarks", "bench_fp8_24.py"), "--json", out, "--tokens",
                             "128,2048,8192", "--prefill", "4:1x2048"))],
                needs=[("install", "install-plain")], artifacts={"json": out}, figures=lambda a: a.get("json", {}))


def _benchmark_steps(work: str, full: bool) -> list[Step]:
    kernels = ["bench_copy.py", "bench_act_stats.py", "bench_mirror.py", "bench_select.py"]
    return [
        _bench_step(work, "sparse-linear", 60, "2:4 sparse (CUTLASS, cuSPARSELt) vs dense F.linear, 7B/70B shapes"
                    + ("" if full else ", bf16 only"), ["bench_sparse_linear.py"], None if full else "bf16",
                    _sparse_linear_figures),
        _bench_step(work, "pack", 30, "2:4 packing: unipruning's CUDA kernel and torch twin vs PyTorch's"
                    + ("" if full else ", bf16 only"), ["bench_pack.py"], None if full else "bf16", _rows_figures),
        _bench_step(work, "kernel-bench", 60, "the calibration kernels (copy, act stats, mirror, select)"
                    + ("" if full else ", triton only (the slow torch twins are in kernels-h100.json)"),
                    kernels, None if full else "not torch", _kernel_figures),
    ]


def _prune_command(model: str, out: str, calib: str, nsamples: int, *extra: str) -> Command:
    return Command(_py("-m", "unipruning", "prune", "--model", model, "--out", out, "--calib", calib,
                       "--nsamples", str(nsamples), "--seqlen", SEQLEN, "--overwrite", *extra))


def _prune_steps(work: str, model: str | None, nsamples: int) -> list[Step]:
    model_dir = model or os.path.join(work, "model")
    calib, heldout = os.path.join(work, "calib.txt"), os.path.join(work, "heldout.txt")
    outs = {k: os.path.join(work, f"pruned-{k}") for k in ("default", "offload", "obs", "torchrun")}
    report = lambda k: {"report": os.path.join(outs[k], "pruning_report.json")}  # noqa: E731
    label = model or "random weights, SmolLM2 shape"
    compare = lambda k: Command(_py(SCRIPT, "--helper", "compare", outs["default"], outs[k],  # noqa: E731
                                    os.path.join(work, f"same-{k}.json")))
    needs = [("install", "install-plain"), ("model",)]
    torchrun = _py("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
    nccl_json = os.path.join(work, "nccl.json")
    return [
        Step("model", 30, f"the model ({label}), a BPE tokenizer if none, calibration and held-out text",
             [Command(_py(SCRIPT, "--helper", "make-model", work, *(["--model", model] if model else [])))],
             artifacts={"json": os.path.join(work, "model.json")}, figures=lambda a: a["json"]),
        Step("prune-default", 45, f"unipruning prune, default settings but --nsamples {nsamples} ({label})",
             [_prune_command(model_dir, outs["default"], calib, nsamples)], needs=needs,
             artifacts=report("default"), figures=_prune_figures),
        Step("prune-offload", 45, "the same with --offload-activations always (side-stream copies); same bytes?",
             [_prune_command(model_dir, outs["offload"], calib, nsamples, "--offload-activations", "always"),
              compare("offload")], needs=needs,
             artifacts={**report("offload"), "json": os.path.join(work, "same-offload.json")}, figures=_prune_figures),
        Step("torchrun-nccl", 45, "NCCL all_gather/all_reduce under torchrun, then prune under torchrun "
             "--nproc_per_node=1 (one process: the package joins no process group); same bytes?",
             [Command([*torchrun, SCRIPT, "--helper", "nccl-probe", nccl_json]),
              Command([*torchrun, "-m", "unipruning", "prune", "--model", model_dir, "--out", outs["torchrun"],
                       "--calib", calib, "--nsamples", str(nsamples), "--seqlen", SEQLEN, "--overwrite"]),
              compare("torchrun")], needs=needs, keep_going=True,
             artifacts={**report("torchrun"), "json": os.path.join(work, "same-torchrun.json"), "nccl": nccl_json},
             figures=_prune_figures),
        Step("prune-obs", 60, f"unipruning prune --reconstruct obs, --nsamples {nsamples} ({label})",
             [_prune_command(model_dir, outs["obs"], calib, nsamples, "--reconstruct", "obs")], needs=needs,
             artifacts=report("obs"), figures=_prune_figures),
        Step("eval", 40, "held-out perplexity (seqlen 2048) of the dense, default and obs models",
             [Command(_py("-m", "unipruning", "eval", "--model", m, "--data", heldout, "--seqlen", "2048", "--json"),
                      stdout=os.path.join(work, f"eval-{k}.json"))
              for k, m in (("dense", model_dir), ("default", outs["default"]), ("obs", outs["obs"]))],
             needs=needs + [("prune-default",), ("prune-obs",)],
             artifacts={f"eval-{k}": os.path.join(work, f"eval-{k}.json") for k in ("dense", "default", "obs")},
             figures=lambda a: {k: v.get("perplexity") for k, v in a.items()},
             skip_reason=None if model else "random weights: a perplexity would mean nothing (give --model DIR)"),
    ]


def _e2e_step(work: str, layers: int) -> Step:
    out = os.path.join(work, "e2e.json")
    scratch = os.path.join(work, "e2e")
    return Step("e2e-70b", 110, f"bench_e2e.py --shape 70b: {layers} decoder layers, 128 x 2048 tokens; the 80 "
                "layers are extrapolated", [
                    Command(_py(os.path.join(ROOT, "benchmarks", "bench_e2e.py"), "--shape", "70b", "--layers",
                                str(layers), "--nsamples", "128", "--seqlen", "2048", "--work", scratch,
                                "--out", out))],
                needs=[("install", "install-plain")], artifacts={"json": out}, figures=_e2e_figures)


def build_plan(args: argparse.Namespace, work: str) -> list[Step]:
    """The steps in the order they run: the never-measured first, the kernel benchmarks (measured on an
    H100 already) last, so that a deadline cuts what matters least."""
    env = Step("env", 20, "device, driver, CUDA, torch/triton/transformers versions, nvidia-smi",
               [Command(_py(SCRIPT, "--helper", "probe", os.path.join(work, "probe.json")))],
               artifacts={"json": os.path.join(work, "probe.json")}, figures=lambda a: a["json"])
    benches = _benchmark_steps(work, args.full)
    steps = [env, *_install_steps(work), *_test_steps(work), *benches[:2], _fp8_step(work),
             *_prune_steps(work, args.model, args.nsamples), _e2e_step(work, args.e2e_layers), benches[2]]
    for step in steps:
        step.budget_s *= args.budget_scale
    return select_steps(steps, args.only, args.skip)


def select_steps(steps: list[Step], only: list[str] | None, skip: list[str] | None) -> list[Step]:
    """--only (with everything the chosen steps need) and --skip; unknown names are a usage error."""
    names = [s.name for s in steps]
    for name in (only or []) + (skip or []):
        if name not in names:
            raise ValueError(f"unknown step {name!r} (steps: {', '.join(names)})")
    chosen = set(names if not only else only)
    by_name = {s.name: s for s in steps}
    pending = list(chosen)
    while pending:  # close over needs: every alternative of a need comes along (install brings its fallback)
        for group in by_name[pending.pop()].needs:
            for name in group:
                if name not in chosen:
                    chosen.add(name)
                    pending.append(name)
    chosen -= set(skip or [])
    return [s for s in steps if s.name in chosen]


# --------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class Result:
    name: str
    status: str  # ok / failed / timeout / skipped
    reason: str | None
    seconds: float
    budget_s: float
    what: str
    commands: list[str]
    returncode: int | None = None
    figures: dict = dataclasses.field(default_factory=dict)
    log: str = ""


class Terminated(Exception):
    """SIGTERM reached this process (the device command's own limit): stop the step, keep the results."""


def _on_sigterm(signum, frame):
    raise Terminated()


# A process group of its own, in this session: a step can be killed with all its children, and whatever is
# left when the device command ends is ended with it (the device spares only processes in a new session).
_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def run_command(cmd: Command, timeout: float, log_path: str, env: dict[str, str]) -> tuple[str, int | None]:
    """Run one command in its own process group, output appended to log_path; ('ok'|'failed'|'timeout', rc).
    On timeout (or SIGTERM here) the whole group is killed (torchrun's workers, pytest's subprocesses too)."""
    with open(log_path, "ab") as log:
        log.write(f"$ {cmd.shell()}\n".encode())
        log.flush()
        stdout = open(cmd.stdout, "wb") if cmd.stdout else log
        try:
            proc = subprocess.Popen(cmd.argv, stdout=stdout, stderr=log, cwd=ROOT, env={**env, **cmd.env}, **_GROUP)
            try:
                rc = proc.wait(timeout=max(timeout, 0.1))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                log.write(f"\n[gpu_check] killed after {timeout:.0f} s (the step's budget)\n".encode())
                return "timeout", None
            except BaseException:
                _kill_group(proc)
                raise
            finally:
                _kill_group(proc, quiet=True)  # leftovers of a finished command (none expected)
        except OSError as e:
            log.write(f"[gpu_check] could not start: {e}\n".encode())
            return "failed", None
        finally:
            if cmd.stdout:
                stdout.close()
    return ("ok" if rc == 0 else "failed"), rc


def _kill_group(proc: subprocess.Popen, quiet: bool = False) -> None:
    """SIGTERM to the command's own process group, SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            if quiet:
                return
        except subprocess.TimeoutExpired:
            continue


def _failure(status: str, rc: int | None, limit: float, budget: float, log_path: str, cmd: Command) -> str | None:
    """Why a command did not succeed: the budget it ran into, or its exit code and last line of output."""
    if status == "timeout":
        return f"killed at {limit:.0f} s" + (" (the overall deadline)" if limit < budget else "")
    if status == "failed":
        return f"{_label(cmd)}: exit {rc}: {telling_line(_tail(log_path, 16384))}"
    return None


def telling_line(log: str) -> str:
    """The line of a failed command's output that says most: its last Python exception, else its last line
    with 'error' in it, else its last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and not ln.startswith(("[gpu_check]", "$ "))
             and "ChildFailedError" not in ln]  # torchrun's wrapper: the worker's own exception says more
    for pattern in (r"^[\w.]+(Error|Exception|Interrupt)\b", r"(?i)\berror\b"):
        found = [ln for ln in lines if re.search(pattern, ln)]
        if found:
            return found[-1][:300]
    return (lines or [""])[-1][:300]


def _label(cmd: Command) -> str:
    """A short name of a command: the module or script, and the helper or subcommand."""
    args = cmd.argv[1:] if cmd.argv[0] == sys.executable else cmd.argv
    if args[:1] == ["-m"]:
        args = args[1:]
    if "--helper" in args:
        return f"helper {args[args.index('--helper') + 1]}"
    words = [os.path.basename(args[0])] if args else []
    return " ".join(words + [w for w in args[1:2] if not w.startswith("-") and os.sep not in w])


def _unmet_need(step: Step, results: dict[str, Result]) -> str | None:
    for group in step.needs:
        if not any(results.get(n) and results[n].status == "ok" for n in group):
            states = ", ".join(f"{n}: {results[n].status if n in results else 'not run'}" for n in group)
            return f"needs {' or '.join(group)} ({states})"
    return None


def skip_reason(step: Step, results: dict[str, Result], remaining: float) -> str | None:
    if step.run_if_failed:
        before = results.get(step.run_if_failed)
        if before is None or before.status == "ok":
            return f"not needed: {step.run_if_failed} " + ("succeeded" if before else "did not run")
    unmet = _unmet_need(step, results)
    if unmet or step.skip_reason:
        return unmet or step.skip_reason
    if remaining < MIN_STEP_S:
        return f"overall deadline: {remaining:.0f} s left"
    return None


def run_step(step: Step, results: dict[str, Result], deadline: float, logs: str, env: dict[str, str]) -> Result:
    remaining = deadline - time.monotonic()
    result = Result(step.name, "skipped", skip_reason(step, results, remaining), 0.0, step.budget_s, step.what,
                    [c.shell() for c in step.commands])
    if result.reason:
        return result
    log_path = os.path.join(logs, f"{step.name}.log")
    start = time.monotonic()
    limit = min(step.budget_s, remaining)
    for cmd in step.commands:
        left = limit - (time.monotonic() - start)
        if left <= 0:  # the budget went on the commands before this one
            if result.status == "ok":
                result.status, result.reason = "timeout", f"budget used up before: {_label(cmd)}"
            break
        status, rc = run_command(cmd, left, log_path, env)
        if result.status in ("skipped", "ok"):  # the first failure is the step's
            result.status, result.returncode = status, rc
            result.reason = _failure(status, rc, limit, step.budget_s, log_path, cmd)
        if status != "ok" and not step.keep_going or status == "timeout":
            break
    result.seconds = time.monotonic() - start
    result.log = _tail(log_path, LOG_TAIL_BYTES)
    result.figures = collect_figures(step)
    return result


def _tail(path: str, nbytes: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def load_artifacts(step: Step) -> dict[str, Any]:
    """Each artifact that exists, parsed (junit XML, JSON); missing ones are left out."""
    loaded = {}
    for kind, path in step.artifacts.items():
        if not os.path.isfile(path):
            continue
        try:
            if kind == "junit":
                loaded[kind] = parse_junit(path)
            else:
                with open(path) as f:
                    loaded[kind] = json.load(f)
        except (OSError, ValueError, ET.ParseError) as e:
            loaded[kind] = {"parse_error": f"{os.path.basename(path)}: {e}"}
    return loaded


def collect_figures(step: Step) -> dict:
    loaded = load_artifacts(step)
    if not step.figures:
        return {}
    try:
        return step.figures(loaded)
    except Exception as e:  # noqa: BLE001 - a figure that cannot be read must not stop the run
        return {"figures_error": f"{type(e).__name__}: {e}", "artifacts": sorted(loaded)}


# --------------------------------------------------------------------------------------------- parsing


def parse_junit(path: str) -> dict:
    """pytest's junit XML: counts and every case's outcome (failure/error/skip message, first line)."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or (node.text or "")).strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def _junit_figures(art: dict) -> dict:
    junit = art.get("junit", {})
    if "counts" not in junit:
        return {"junit": junit or "missing"}
    bad = [f"{c['test']}: {c['message']}" for c in junit["cases"] if c["outcome"] in ("failed", "error")]
    skipped: dict[str, int] = {}
    for c in junit["cases"]:
        if c["outcome"] == "skipped":
            skipped[c["message"]] = skipped.get(c["message"], 0) + 1
    return {**junit["counts"], "not_passed": bad[:30], "skip_reasons": skipped}


def _bench_rows(art: dict) -> list[dict]:
    return (art.get("bench") or {}).get("results", [])


def _dtype(row: dict) -> str:
    return row["name"].rstrip("]").split("-")[-1]  # the last id of the parametrisation (fp16/bf16)


def _sparse_linear_figures(art: dict) -> dict:
    """Per shape, tokens and dtype: each provider's median ms and its speed-up over dense."""
    table: dict[tuple, dict] = {}
    for row in _bench_rows(art):
        p = row.get("params") or {}
        key = (f"{p['shape'][0]}x{p['shape'][1]}", p["tokens"], _dtype(row))
        table.setdefault(key, {})[p["provider"]] = row["ms"]
    out = []
    for (shape, tokens, dtype), ms in sorted(table.items()):
        entry = {"shape": shape, "tokens": tokens, "dtype": dtype, **{f"{k}_ms": round(v, 4) for k, v in ms.items()}}
        for sparse in ("cutlass", "cusparselt"):
            if ms.get("dense") and ms.get(sparse):
                entry[f"{sparse}_speedup"] = round(ms["dense"] / ms[sparse], 3)
        out.append(entry)
    return {"rows": len(_bench_rows(art)), "speedups": out, "tests": _junit_figures(art).get("not_passed")}


def _rows_figures(art: dict) -> dict:
    rows = [{"name": r["name"], "ms": round(r["ms"], 4), "gbps": round(r["gbps"], 1)} for r in _bench_rows(art)]
    return {"rows": rows, "tests": _junit_figures(art)}


def _kernel_figures(art: dict) -> dict:
    bench = art.get("bench") or {}
    rows = [{"name": r["name"], "ms": round(r["ms"], 4), "gbps": round(r["gbps"], 1),
             "of_copy": round(r["fraction_of_copy"], 3) if r.get("fraction_of_copy") else None}
            for r in bench.get("results", [])]
    return {"copy_bandwidth_gbps": bench.get("copy_bandwidth_gbps"), "rows": rows}


def _aot_figures(art: dict) -> dict:
    rows = (art.get("json") or {}).get("results", [])
    return {"device": (art.get("json") or {}).get("device"), "variants": len(rows),
            "differ": [f"{r['kernel']} [{r['variant']}]: {r['device_registers']} registers on the device, "
                       f"{r['table_registers']} in the table" for r in rows if not r["same"]],
            "spills": sum(r["device_spills"] for r in rows)}


def _gib(n: int | None) -> float | None:
    return round(n / (1 << 30), 3) if n else None


def _install_figures(art: dict) -> dict:
    return {**art.get("json", {"extension": "not probed"}), "cuda_home": cuda_home()}


def _prune_figures(art: dict) -> dict:
    rep = art.get("report") or {}
    blocks = rep.get("blocks") or []
    figures = {
        "wall_seconds": rep.get("wall_seconds"), "calibration_seconds": rep.get("calibration_seconds"),
        "blocks": len(blocks),
        "block_seconds_mean_after_first": (sum(b["seconds"] for b in blocks[1:]) / (len(blocks) - 1)
                                           if len(blocks) > 1 else None),
        "sparsity": (rep.get("total") or {}).get("sparsity"),
        "peak_gpu_allocated_gib": _gib((rep.get("peak_memory") or {}).get("gpu_max_allocated_bytes")),
        "peak_cpu_rss_gib": _gib((rep.get("peak_memory") or {}).get("cpu_max_rss_bytes")),
        "backend": (rep.get("settings") or {}).get("backend_used"),
        "device": (rep.get("settings") or {}).get("device_used"), "processes": rep.get("processes"),
    }
    if isinstance(rep.get("reconstruction"), dict):
        figures["reconstruction_seconds"] = rep["reconstruction"].get("seconds")
    if "json" in art:
        figures["same_tensors_as_prune_default"] = art["json"].get("equal")
    if "nccl" in art:
        figures["nccl_probe"] = art["nccl"]
    return figures


def _e2e_figures(art: dict) -> dict:
    e2e = art.get("json") or {}
    extra = e2e.get("extrapolation") or {}
    return {
        "layers_measured": e2e.get("layers_written"), "tokens": f"{e2e.get('nsamples')} x {e2e.get('seqlen')}",
        "calibration_seconds_per_layer": e2e.get("calibration_seconds_per_layer"),
        "write_seconds_per_layer": e2e.get("write_seconds_per_layer"),
        "disk_read_seconds_per_layer": e2e.get("disk_read_seconds_per_layer"),
        "disk_reads_cold": e2e.get("disk_reads_cold"), "prune_process_seconds": e2e.get("prune_process_seconds"),
        "peak_gpu_allocated_gib": _gib(e2e.get("peak_gpu_allocated_bytes")),
        "peak_cpu_rss_gib": _gib(e2e.get("peak_cpu_rss_bytes")),
        "EXTRAPOLATED_not_measured": {"layers": extra.get("layers"), "seconds": extra.get("seconds"),
                                      "how": extra.get("note")},
    }


# ---------------------------------------------------------------------------------------------- output


def write_json(path: str, obj: Any, max_bytes: int = OUT_FILE_BYTES) -> int:
    """Write obj as JSON; if it would exceed max_bytes, a valid JSON stand-in holding its head instead."""
    text = json.dumps(obj, indent=1, default=str)
    if len(text.encode()) > max_bytes:
        head = text.encode()[: max_bytes // 2].decode("utf-8", "ignore")
        text = json.dumps({"truncated": True, "original_bytes": len(text.encode()), "head": head})
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # a kill mid-write leaves the previous complete file
    return len(text.encode())


def check_return_limits(out: str) -> list[str]:
    """What in `out` the device machine would not return (too many files, too big, too deep, odd names)."""
    problems, files, total = [], 0, 0
    for dirpath, dirnames, filenames in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for name in dirnames + filenames:
            if not NAME_OK.match(name):
                problems.append(f"{os.path.join(rel, name)}: a name of other characters than letters, digits, ._-")
        for name in filenames:
            size = os.path.getsize(os.path.join(dirpath, name))
            files, total = files + 1, total + size
            if depth > RETURN_LIMITS["depth"]:
                problems.append(f"{os.path.join(rel, name)}: more than {RETURN_LIMITS['depth']} folders down")
            if size > RETURN_LIMITS["file_bytes"]:
                problems.append(f"{os.path.join(rel, name)}: {size} bytes, over {RETURN_LIMITS['file_bytes']}")
    if files > RETURN_LIMITS["files"]:
        problems.append(f"{files} files, over {RETURN_LIMITS['files']}")
    if total > RETURN_LIMITS["total_bytes"]:
        problems.append(f"{total} bytes in all, over {RETURN_LIMITS['total_bytes']}")
    return problems


def git_hash(given: str | None, root: str = ROOT) -> dict:
    """The checkout's commit (and whether tracked files differ from it), else what --git-hash says."""
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return {"hash": head.stdout.strip(), "source": "git", "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"hash": given, "source": "--git-hash" if given else "unknown: no git checkout and no --git-hash"}


def write_outputs(out: str, meta: dict, results: list[Result], plan: list[Step]) -> list[str]:
    """The (at most 8) files the device returns, rewritten after every step so that a kill keeps them."""
    by_kind: dict[str, dict] = {"junit": {}, "bench": {}, "report": {}, "json": {}}
    ran = {r.name for r in results if r.status != "skipped"}
    for step in plan:
        for kind, value in (load_artifacts(step) if step.name in ran else {}).items():
            by_kind[kind if kind in by_kind else "json"][f"{step.name}:{kind}"] = value
    steps = [{k: v for k, v in dataclasses.asdict(r).items() if k != "log"} for r in results]
    write_json(os.path.join(out, "logs.json"), {r.name: {"commands": r.commands, "log_tail": r.log}
                                                for r in results if r.status != "skipped"})
    write_json(os.path.join(out, "tests.json"), by_kind["junit"])
    write_json(os.path.join(out, "benchmarks.json"), by_kind["bench"])
    write_json(os.path.join(out, "prune.json"), by_kind["report"])
    write_json(os.path.join(out, "results.json"), by_kind["json"])
    summary = {"meta": meta, "steps": steps,
               "totals": {s: sum(r.status == s for r in results) for s in ("ok", "failed", "timeout", "skipped")}}
    write_json(os.path.join(out, "summary.json"), summary)
    problems = check_return_limits(out)
    summary["return_limits"] = problems or "ok"
    write_json(os.path.join(out, "summary.json"), summary)
    return problems


def print_table(results: list[Result]) -> None:
    print(f"\n{'step':<15} {'status':<8} {'s':>6} {'budget':>6}  figures / reason")
    for r in results:
        note = r.reason or json.dumps(r.figures, default=str)
        print(f"{r.name:<15} {r.status:<8} {r.seconds:6.1f} {r.budget_s:6.0f}  {note[:200]}")


# ---------------------------------------------------------------------------------------------- helpers
# Small jobs the steps run in their own processes (so that each has a budget): torch, transformers and
# tokenizers only.


def helper_probe(path: str) -> None:
    import platform

    import torch
    import transformers
    import triton

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            return f"unavailable: {e}"

    smi = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
              "--format=csv,noheader")
    props = torch.cuda.get_device_properties(0)
    info = {
        "device": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / (1 << 30), 1),
        "nvidia_smi": smi, "driver": smi.split(",")[1].strip() if smi.count(",") >= 1 else None,
        "cuda_runtime_of_torch": torch.version.cuda,
        "nvcc": next((ln for ln in run("nvcc", "--version").splitlines() if "release" in ln), None),
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(run("nvidia-smi"))
    with open(path, "w") as f:
        json.dump(info, f, indent=1)


def _texts(work: str) -> None:
    """calib.txt (every play but the held-out ones) and heldout.txt, split by play, from benchmarks/data."""
    names = sorted(n for n in os.listdir(TEXTS) if n.endswith("_gut.txt"))
    for target, chosen in (("calib.txt", [n for n in names if n not in HELD_OUT]), ("heldout.txt", HELD_OUT)):
        with open(os.path.join(work, target), "w", encoding="utf-8") as f:
            f.write("\n\n".join(open(os.path.join(TEXTS, n), encoding="utf-8").read() for n in chosen))


def _tokenizer(calib: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([open(calib, encoding="utf-8").read()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=1 << 20)


def helper_make_model(work: str, model: str | None, layers: int | None = None) -> dict:
    """The texts, and unless `model` is given a random bf16 Llama of SmolLM2's shape with a BPE tokenizer
    trained on the calibration text (its ids all fall inside the model's 49152)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    os.makedirs(work, exist_ok=True)
    _texts(work)
    info = {"model": model, "weights": "given checkpoint"}
    if model is None:
        dims = {**SMOLLM2, "num_hidden_layers": layers or SMOLLM2["num_hidden_layers"]}
        config = LlamaConfig(**dims, bos_token_id=0, eos_token_id=1, dtype="bfloat16")
        torch.manual_seed(0)
        target = os.path.join(work, "model")
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(target)
        _tokenizer(os.path.join(work, "calib.txt")).save_pretrained(target)
        info = {"model": target, "weights": "random weights, SmolLM2 shape", "config": dims,
                "tokenizer": f"byte-level BPE, {TOKENIZER_VOCAB} tokens, trained on calib.txt"}
    with open(os.path.join(work, "model.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def helper_ext_probe(path: str) -> None:
    """Whether the compiled extension imports (a failed import is a finding, not an error of the step)."""
    import importlib

    try:
        module = importlib.import_module("unipruning._C")
        info = {"extension": "imported", "file": os.path.relpath(module.__file__, ROOT)}
    except Exception as e:  # noqa: BLE001 - any import failure is what we record
        info = {"extension": "absent", "error": f"{type(e).__name__}: {e}"[:500]}
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))


def _tensor_digests(directory: str) -> dict[str, str]:
    import hashlib

    import torch
    from safetensors import safe_open

    digests = {}
    for path in sorted(glob.glob(os.path.join(directory, "**", "*.safetensors"), recursive=True)):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                flat = f.get_tensor(key).contiguous().reshape(-1)  # 0-d tensors (thresholds) too
                digests[f"{os.path.relpath(path, directory)}:{key}"] = hashlib.sha256(
                    flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    return digests


def helper_compare(a: str, b: str, path: str) -> int:
    """Whether two prune outputs hold the same tensors bit for bit (weights and saliency); exit 1 if not."""
    da, db = _tensor_digests(a), _tensor_digests(b)
    differ = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
    result = {"a": a, "b": b, "tensors": len(da), "equal": bool(da) and not differ, "differing": differ[:20]}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0 if result["equal"] else 1


def helper_nccl_probe(path: str) -> int:
    """Under torchrun: join an NCCL group and run the collectives the package's data parallelism uses
    (all_gather of float64 sums, all_reduce of an int64 count), checking their values."""
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    start = time.perf_counter()
    dist.init_process_group("nccl")
    size = dist.get_world_size()
    mine = torch.full((4096,), float(rank + 1), dtype=torch.float64, device="cuda")
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine)
    count = torch.tensor([rank + 1], dtype=torch.int64, device="cuda")
    dist.all_reduce(count)
    ok = all(torch.all(p == r + 1).item() for r, p in enumerate(parts)) and count.item() == size * (size + 1) // 2
    version = torch.cuda.nccl.version()
    result = {"backend": dist.get_backend(), "world_size": size, "collectives_correct": bool(ok),
              "nccl": ".".join(map(str, version)) if isinstance(version, tuple) else str(version),
              "seconds": time.perf_counter() - start}
    dist.destroy_process_group()
    if rank == 0:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0 if ok else 1


def run_helper(name: str, args: list[str]) -> int:
    if name == "probe":
        helper_probe(args[0])
    elif name == "make-model":
        p = argparse.ArgumentParser(prog="gpu_check --helper make-model")
        p.add_argument("work")
        p.add_argument("--model", default=None)
        p.add_argument("--layers", type=int, default=None)
        a = p.parse_args(args)
        print(json.dumps(helper_make_model(a.work, a.model, a.layers)))
    elif name == "ext-probe":
        helper_ext_probe(args[0])
    elif name == "compare":
        return helper_compare(*args)
    elif name == "nccl-probe":
        return helper_nccl_probe(args[0])
    return 0


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="results folder (on the device machine: $OUT)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--dry-run", action="store_true", help="list the steps, budgets and commands; run nothing")
    p.add_argument("--model", default=None, help="a real checkpoint for the prune steps (default: random "
                   "weights in SmolLM2-135M's shape, built there)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows of the SmolLM2 prunes "
                   "(seqlen 2048; the CLI's default 128 does not fit the budget)")
    p.add_argument("--e2e-layers", type=int, default=3, help="70B-shaped decoder layers bench_e2e.py prunes")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole run")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's budget (a slower "
                   "machine, or a rerun of steps that ran out of time)")
    p.add_argument("--only", nargs="+", metavar="STEP", help="run these steps (and what they need)")
    p.add_argument("--skip", nargs="+", metavar="STEP")
    p.add_argument("--full", action="store_true", help="every benchmark case (fp16 too, the slow torch twins)")
    p.add_argument("--git-hash", default=None, help="recorded when the folder is not a git checkout")
    args = p.parse_args(argv)
    if not args.dry_run and not args.out:
        p.error("--out DIR is required (or --dry-run)")
    return args


def print_plan(plan: list[Step], deadline: float) -> None:
    total = sum(s.budget_s for s in plan if not s.run_if_failed and not s.skip_reason)
    print(f"{len(plan)} steps, budgets {total:.0f} s in all (fallbacks and known skips not counted), "
          f"deadline {deadline:.0f} s for the whole run\n")
    for s in plan:
        cond = f" [only if {s.run_if_failed} fails]" if s.run_if_failed else ""
        cond += f" [skipped: {s.skip_reason}]" if s.skip_reason else ""
        print(f"{s.name}  budget {s.budget_s:.0f} s{cond}: {s.what}")
        for c in s.commands:
            print(f"    {c.shell()}")


def gpu_missing() -> str | None:
    """Why this machine cannot run the check, or None."""
    try:
        import torch
    except ImportError as e:
        return f"torch is not importable ({e})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def run_plan(plan: list[Step], out: str, work: str, deadline_s: float, meta: dict) -> list[Result]:
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, never interpreted
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", UNIPRUNING_CACHE=os.path.join(work, "cache"))
    deadline = time.monotonic() + deadline_s
    results: dict[str, Result] = {}
    for step in plan:
        try:
            result = run_step(step, results, deadline, logs, env)
        except Terminated:
            results[step.name] = Result(step.name, "timeout", "gpu_check itself was terminated (SIGTERM) during "
                                        "this step; later steps did not run", 0.0, step.budget_s, step.what,
                                        [c.shell() for c in step.commands])
            write_outputs(out, meta, list(results.values()), plan)
            raise
        results[step.name] = result
        print(f"[gpu_check] {step.name}: {result.status} in {result.seconds:.1f} s"
              + (f" ({result.reason})" if result.reason else ""), flush=True)
        if step.name == "env" and result.status == "ok":
            meta.update(result.figures)
        write_outputs(out, meta, list(results.values()), plan)
    return list(results.values())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--helper"] and len(argv) > 1:
        return run_helper(argv[1], argv[2:])
    args = parse_args(argv)
    work = args.work or os.path.join(tempfile.gettempdir(), f"gpu-check-{os.getpid()}")
    try:
        plan = build_plan(args, work)
    except ValueError as e:
        print(f"gpu_check: --only/--skip: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(plan, args.deadline)
        return 0
    why = gpu_missing()
    if why:
        print(f"gpu_check: needs a CUDA GPU: {why}; nothing was run (--dry-run lists the steps)", file=sys.stderr)
        return EXIT_NO_GPU
    meta = {"git": git_hash(args.git_hash), "argv": sys.argv[1:], "deadline_s": args.deadline,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model_for_prune": args.model or "random weights, SmolLM2 shape"}
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        results = run_plan(plan, args.out, work, args.deadline, meta)
    except Terminated:
        print("gpu_check: terminated; the results so far are in " + args.out, file=sys.stderr)
        return 143
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    problems = check_return_limits(args.out)
    print(f"\nresults in {args.out}: " + (", ".join(sorted(os.listdir(args.out))) if not problems
                                         else f"NOT all returnable: {problems}"))
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
