"""Ahead-of-time compile of every Triton kernel of kernels/ for sm_80 and sm_90, on any machine: no GPU, no driver.

Each kernel's arguments are the ones its own launcher produces for Llama-2-70B shapes (8192x8192, 28672x8192,
8192x28672; bf16 and fp32 where the kernel takes both): the launcher runs on empty CPU tensors with
`JITFunction.run` intercepted at the launch, which records the arguments and stops it. Triton 3.6 then compiles
every distinct variant (its signature, constexprs, specialisation and options) for each target with its bundled
ptxas, and the results are written to benchmarks/results/kernels-aot.json: per kernel, variant and arch the
registers, spills, stack, shared memory, theoretical occupancy and a status (ok, or what is wrong: a compile
error, a spill, an approximate float instruction where the kernels promise their twins' rounding).

    python benchmarks/aot_compile.py                 # compile, write the JSON (about a minute on 2 cores)
    python benchmarks/aot_compile.py --check         # CI: also fail when the committed JSON is not what this
                                                     # code compiles to (run the line above and commit)
    python benchmarks/aot_compile.py --table         # docs/development.md's table, from the committed JSON
    python benchmarks/aot_compile.py --device-check OUT.json   # on a GPU: the driver's registers and spills of
                                                     # every variant, compiled for it, against the table

Theoretical occupancy follows the CUDA occupancy calculator: resident warps per SM over 64, with registers
allocated per warp in units of 256, 1 KiB of shared memory reserved per block, and at most 32 blocks, 65536
registers and 164 KiB (sm_80) / 228 KiB (sm_90) of shared memory per SM. Nothing here runs a kernel: the speed
of a variant is measured only on a GPU (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import io
import json
import math
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "kernels-aot.json")
ARCHS = (80, 90)
SHAPES = ((8192, 8192), (28672, 8192), (8192, 28672))  # Llama-2-70B's q/o, gate/up, down
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOKENS = 16384  # the largest micro-batch of a forward (pipeline/stream.py)
DATA = " | data: "  # in a case label: what follows is data, not shape or dtype
# per kernel, the instructions of INEXACT it may contain: the Hessian's float32 tl.dot multiplies and adds
# in fused steps (it is held to its twin by flash-attention's rule, not bit for bit)
ALLOWED = {"_hessian_kernel": {"fma.rn.f32"}}
# PTX instructions that round differently from torch's IEEE float32 (approximations) or fuse a product into a
# sum: the kernels are bit-identical to their twins only without them
INEXACT = re.compile(r"\b(div\.full\.f32|div\.approx\.\w+|rcp\.approx\.\w+|sqrt\.approx\.\w+|ex2\.approx\.\w+|"
                     r"lg2\.approx\.\w+|sin\.approx\.\w+|cos\.approx\.\w+|tanh\.approx\.\w+|fma\.rn\.f32)\b")
# per SM: (shared memory bytes, shared memory per block at most)
SHARED = {80: (167936, 166912), 90: (233472, 232448)}


class Captured(Exception):
    """Raised at the intercepted launch: the launcher's arguments are recorded, nothing runs."""


@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict


def capture(call: Callable[[], object]) -> Launch:
    """The first kernel launch `call` makes, with the arguments its launcher gives it."""
    seen: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        seen.append(Launch(self, args, kwargs))
        raise Captured()

    real = JITFunction.run
    JITFunction.run = run
    try:
        call()
    except Captured:
        pass
    finally:
        JITFunction.run = real
    if not seen:
        raise RuntimeError("the launcher launched no kernel")
    return seen[0]


def specialization(launch: Launch, arch: int) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) Triton derives from the launch's arguments for `arch`: what
    decides whether a launch reuses a compiled kernel."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, options, bound, spec, options)
    return signature, constexprs, attrs, options.__dict__


# ---------------------------------------------------------------------------------------------------- cases
def _empty(shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype)  # never touched: only shapes, dtypes and alignment matter


def _cases() -> dict[str, Callable[[], object]]:
    """{case label: a call of a launcher}, each launching one kernel first. Labels that differ only after
    DATA name launches that differ only in data (token counts, bracket bounds, hints): they must share one
    compiled variant, or a kernel would compile again in the middle of a run."""
    from unipruning.kernels import act_stats, metrics, mirror, nm, obs, refine, select

    cases: dict[str, Callable[[], object]] = {}
    for name, dtype in DTYPES.items():
        for cols in sorted({c for _, c in SHAPES}):
            for tokens in (TOKENS, TOKENS - 1):
                cases[f"act_sqsum x {cols} {name}{DATA}{tokens} tokens"] = lambda c=cols, d=dtype, t=tokens: \
                    act_stats.act_sqsum_triton(torch.zeros(c, dtype=torch.float64), _empty((t, c), d))
                cases[f"hessian x {cols} {name}{DATA}{tokens} tokens"] = lambda c=cols, d=dtype, t=tokens: \
                    obs.hessian_accumulate_triton(_empty((c, c)), _empty((t, c), d))
        for rows, cols in SHAPES:
            shape = f"{rows}x{cols}"
            for metric in ("wanda", "ria", "stochria"):
                cases[f"step_sums {metric} {shape} {name}"] = lambda r=rows, c=cols, d=dtype, m=metric: \
                    metrics.step_sums_triton(_empty((r, c), d), torch.ones(c, dtype=torch.float64), m, 1)
            for metric, hint in (("wanda", -1), ("ria", -1), ("ria", (1 << 62) | 5000)):
                data = "no hint" if hint < 0 else "a hint"
                cases[f"mirror_step {metric} {shape} {name}{DATA}{data}"] = \
                    lambda r=rows, c=cols, d=dtype, m=metric, h=hint: mirror.mirror_step_triton(
                        _empty((r, c)), _empty((r, c), d), *_vectors(r, c, m), 0.01, 0.5, r * c // 1000, h)
            count = rows * cols // 100  # the closed form's candidates: 1% of the matrix
            for metric, hint in (("wanda", -1), ("ria", -1), ("ria", (1 << 62) | 5000)):
                data = "no hint" if hint < 0 else "a hint"
                cases[f"candidate_step {metric} {count} of {shape}{DATA}{data}"] = \
                    lambda r=rows, c=cols, k=count, m=metric, h=hint: mirror.candidate_step_triton(
                        _empty(k), _empty(k), _empty(k, torch.int32), _empty(k, torch.int32), *_vectors(r, c, m),
                        0.01, 0.5, k // 10, h)
            cases[f"rank_keys {shape} {name}"] = lambda r=rows, c=cols, d=dtype: select.rank_keys_triton(
                _empty((r, c)), _empty((r, c), d))
    for rows, cols in SHAPES:
        shape, numel = f"{rows}x{cols}", rows * cols
        for k in (numel // 1000, numel - 1):
            cases[f"kth_smallest float32 {shape}{DATA}k {k}"] = lambda r=rows, c=cols, k=k: _select(
                lambda: select.kth_smallest_triton(_empty((r, c)), k))
            cases[f"kth_smallest rank keys {shape}{DATA}k {k}"] = lambda r=rows, c=cols, k=k: _select(
                lambda: select.kth_smallest_triton(_empty((r, c), torch.int64), k))
        for kth in (1 << 61, 5):
            cases[f"topk_mask {shape}{DATA}key {kth}"] = lambda r=rows, c=cols, kth=kth: _select(
                lambda: select.topk_mask_triton(_empty((r, c), torch.int64), r * c // 2), kth)
        for n, m in ((2, 4), (4, 8)):
            cases[f"nm_mask {n}:{m} {shape}"] = lambda r=rows, c=cols, n=n, m=m: nm.nm_mask_triton(
                _empty((r, c), torch.int64), n, m)
        for rule, kwargs in (("mask", lambda r, c: {"keep": torch.ones((r, c), dtype=torch.bool)}),
                             ("2:4", lambda r, c: {"nm": (2, 4)}),
                             ("2:4 guided", lambda r, c: {"nm": (2, 4), "prior": _empty((r, c))}),
                             ("4:8 guided", lambda r, c: {"nm": (4, 8), "prior": _empty((r, c))})):
            cases[f"obs_sweep {rule} {shape}"] = lambda r=rows, c=cols, k=kwargs: obs.obs_sweep_triton(
                _empty((r, c)), _empty((c, c)), **k(r, c))
        for iters in (20, 16, 1):  # --refine-iters is data: one compile for every value (16 and 1 included)
            cases[f"refine_rows {shape}{DATA}{iters} iters"] = lambda r=rows, c=cols, i=iters: \
                refine.refine_rows_triton(*_refine_args(r, c), i)
            for m in (4, 8):
                cases[f"refine_nm m={m} {shape}{DATA}{iters} iters"] = lambda r=rows, c=cols, m=m, i=iters: \
                    refine.refine_nm_triton(*_refine_args(r, c), m, i)
    return cases


def _refine_args(rows: int, cols: int):
    """keep, r, w and gram of the swap refinement (kernels/refine.py), empty."""
    return (torch.zeros((rows, cols), dtype=torch.bool), _empty((rows, cols)), _empty((rows, cols)),
            _empty((cols, cols)))


def _vectors(rows: int, cols: int, metric: str):
    with_rows = metric != "wanda"
    return (_empty(rows) if with_rows else None, _empty(cols) if with_rows else None, _empty(cols))


def _select(call, kth: int | None = None):
    """A selection launcher with its torch steps around the launch replaced: the sample (which would touch the
    data) by a fixed one, and, given `kth`, the k-th key (the bracket kernel's answer) by that one."""
    from unipruning.kernels import select

    sample, select_key = select._sample, select.select_key
    select._sample = lambda tensors, total: torch.arange(1 << 12, dtype=torch.int64) << 20
    if kth is not None:
        select.select_key = lambda tensors, k, kind: (kth, k - 1, 1)
    try:
        return call()
    finally:
        select._sample, select.select_key = sample, select_key


# --------------------------------------------------------------------------------------------------- compile
def _key(spec: tuple[dict, dict, dict, dict]) -> str:
    return json.dumps([spec[0], sorted(map(str, spec[1].items())), sorted(map(str, spec[2].items())),
                       {k: v for k, v in spec[3].items() if k in ("num_warps", "num_stages", "enable_fp_fusion")}],
                      sort_keys=True, default=str)


def compile_variant(module: str, name: str, spec: tuple[dict, dict, dict, dict], arch: int) -> dict:
    """Compile one variant (the kernel's module and name, its specialisation for `arch`); its resources."""
    import importlib

    from triton import knobs

    fn = getattr(importlib.import_module(module), name)
    signature, constexprs, attrs, options = spec
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                      options=options)
    except Exception as e:  # noqa: BLE001 - a compile error is a result, reported in the table
        return {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    text = log.getvalue()
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    stack, stores, loads = (int(v) for v in re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text).groups())
    inexact = sorted(set(INEXACT.findall(compiled.asm["ptx"])) - ALLOWED.get(name, set()))
    warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared
    problems = ([f"spills {stores} B stored, {loads} B loaded"] if stores or loads else []) + \
        ([f"inexact float instructions: {', '.join(inexact)}"] if inexact else [])
    return {"num_warps": warps, "registers": regs, "spill_stores": stores, "spill_loads": loads, "stack": stack,
            "shared": shared, **occupancy(regs, warps, shared, arch),
            "status": "; ".join(problems) if problems else "ok"}


def occupancy(registers: int, warps: int, shared: int, arch: int) -> dict:
    """Theoretical occupancy (resident warps / 64) and its limiting resource."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    smem_sm, smem_block = SHARED[arch]
    block_smem = math.ceil((shared + 1024) / 128) * 128
    limits = {"warps": 64 // warps, "registers": (65536 // per_warp) // warps, "blocks": 32,
              "shared": smem_sm // block_smem if shared <= smem_block else 0}
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "occupancy": round(blocks * warps / 64, 4),
            "limited_by": min(limits, key=lambda k: (limits[k], k != "registers"))}


def variants(only: str | None = None) -> list[dict]:
    """Every case (or those whose label starts with `only`) captured, grouped into named variants: the launch
    (one of the group's), its kernel and module, its specialisation for sm_90, the case labels."""
    found: dict[tuple[str, str], dict] = {}
    for label, call in _cases().items():
        if only and not label.startswith(only):
            continue
        launch = capture(call)
        name, module = launch.fn.fn.__name__, launch.fn.fn.__module__
        spec = specialization(launch, ARCHS[-1])
        entry = found.setdefault((name, _key(spec)), {"kernel": name, "module": module, "launch": launch,
                                                      "spec": spec, "cases": []})
        entry["cases"].append(label)
    _name_variants(list(found.values()))
    return list(found.values())


def collect(workers: int, only: str | None = None) -> list[dict]:
    """Every variant compiled for every arch: one result row each."""
    jobs = [(v, arch) for v in variants(only) for arch in ARCHS]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        done = pool.map(_compile_job, [(v["module"], v["kernel"], specialization(v["launch"], arch), arch)
                                       for v, arch in jobs])
        rows = [{"kernel": v["kernel"], "variant": v["variant"], "arch": f"sm_{arch}", **result,
                 "cases": v["cases"]} for (v, arch), result in zip(jobs, done, strict=True)]
    return sorted(rows, key=lambda r: (r["kernel"], r["variant"], r["arch"]))


def _compile_job(job):
    return compile_variant(*job)


def _name_variants(variants: list[dict]) -> None:
    """A short name per variant: its constexprs, and the argument types that differ between its kernel's
    variants."""
    by_kernel: dict[str, list[dict]] = {}
    for v in variants:
        by_kernel.setdefault(v["kernel"], []).append(v)
    for group in by_kernel.values():
        signatures = [v["spec"][0] for v in group]
        differing = [k for k in signatures[0]
                     if len({s[k] for s in signatures}) > 1 and signatures[0][k] != "constexpr"]
        for v in group:
            names = list(v["spec"][0])
            consts = [f"{names[path[0]]}={value}" for path, value in sorted(v["spec"][1].items())]
            types = [f"{k}:{v['spec'][0][k]}" for k in differing]
            warps = v["spec"][3].get("num_warps")
            v["variant"] = " ".join(types + consts + [f"warps={warps}"])
        names = [v["variant"] for v in group]
        for v in group:  # a specialisation on an integer's value (divisible by 16, equal to 1) tells them apart
            if names.count(v["variant"]) > 1:
                attrs = sorted(f"{list(v['spec'][0])[path[0]]}:{value}" for path, value in v["spec"][2].items()
                               if value)
                v["variant"] += " " + " ".join(attrs)


# ------------------------------------------------------------------------------------------------ outputs
def document(rows: list[dict]) -> dict:
    return {
        "what": "every Triton kernel of kernels/ compiled ahead of time (benchmarks/aot_compile.py); nothing run",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU needed",
        "versions": {"triton": triton.__version__, "torch": torch.__version__.split("+")[0],
                     "ptxas": _ptxas_version()},
        "shapes": [f"{r}x{c}" for r, c in SHAPES], "tokens": TOKENS,
        "occupancy_model": "resident warps / 64; registers per warp in units of 256; 1 KiB reserved shared "
                           "memory per block; 32 blocks, 65536 registers, 164 KiB (sm_80) / 228 KiB (sm_90) per SM",
        "results": rows,
    }


def _ptxas_version() -> str:
    from triton.backends.nvidia.compiler import get_ptxas_version

    return get_ptxas_version(ARCHS[-1]).strip().splitlines()[-1]


def recompiles(doc: dict) -> dict[str, int]:
    """{case label before DATA: variants} where launches differing only in data compiled more than once."""
    variants: dict[str, set] = {}
    for r in doc["results"]:
        for case in r["cases"]:
            if DATA in case:
                variants.setdefault(case.split(DATA)[0], set()).add((r["kernel"], r["variant"], r["arch"]))
    return {base: len(v) // len(ARCHS) for base, v in variants.items() if len(v) > len(ARCHS)}


def stable(doc: dict) -> list[dict]:
    """What must not change unless the kernels or their launchers change (no date, machine or versions)."""
    return doc["results"]


def table(doc: dict) -> str:
    """docs/development.md's table: one row per kernel and variant, sm_80 / sm_90 side by side."""
    pairs: dict[tuple[str, str], dict[str, dict]] = {}
    for r in doc["results"]:
        pairs.setdefault((r["kernel"], r["variant"]), {})[r["arch"]] = r
    lines = ["| kernel | variant | registers sm_80 / sm_90 | spills | shared (B) | occupancy sm_80 / sm_90 | status |",
             "|---|---|---|---|---|---|---|"]
    for (kernel, variant), by_arch in sorted(pairs.items()):
        a, b = (by_arch.get(f"sm_{arch}", {}) for arch in ARCHS)
        status = "ok" if a.get("status") == b.get("status") == "ok" else f"{a.get('status')} / {b.get('status')}"
        spills = sum(r.get("spill_stores", 0) + r.get("spill_loads", 0) for r in (a, b))
        lines.append(f"| `{kernel}` | {variant} | {a.get('registers')} / {b.get('registers')} | {spills} | "
                     f"{a.get('shared')} / {b.get('shared')} | {_pct(a)} / {_pct(b)} | {status} |")
    return "\n".join(lines)


def _pct(row: dict) -> str:
    return f"{100 * row['occupancy']:.1f}%" if "occupancy" in row else "-"


def device_check(out: str) -> int:
    """On a GPU: compile every variant for the device, load it, and compare the driver's registers and spills
    with the committed table's row of that arch (sm_90 for an H100/H200). Writes `out`; 1 if any differs."""
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    with open(RESULTS) as f:
        table_rows = {(r["kernel"], r["variant"]): r for r in json.load(f)["results"] if r["arch"] == f"sm_{arch}"}
    rows = []
    for v in variants():
        signature, constexprs, attrs, options = specialization(v["launch"], arch)
        compiled = triton.compile(ASTSource(v["launch"].fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        compiled._init_handles()  # loads the cubin: the driver's own figures
        row = table_rows.get((v["kernel"], v["variant"]), {})
        rows.append({"kernel": v["kernel"], "variant": v["variant"], "arch": f"sm_{arch}",
                     "device_registers": compiled.n_regs, "device_spills": compiled.n_spills,
                     "table_registers": row.get("registers"), "same": row.get("registers") == compiled.n_regs})
    doc = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "versions": {"triton": triton.__version__, "torch": torch.__version__}, "results": rows}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    differ = [r for r in rows if not r["same"]]
    print(f"aot_compile: {len(rows)} variants loaded on {doc['device']}, {len(differ)} differ from the table")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=RESULTS, help="where the JSON goes (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="fail on an error, a spill or an inexact instruction, or when --out differs")
    parser.add_argument("--table", action="store_true", help="print docs/development.md's table of --out and exit")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", help="the cases whose label starts with this (e.g. mirror_step), not written")
    parser.add_argument("--device-check", metavar="OUT", help="on a GPU: the driver's registers against the table")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.out) as f:
            print(table(json.load(f)))
        return 0
    # compiled, not interpreted (set before the kernels are imported); in a cache of its own, so that every
    # compile runs ptxas and logs its registers
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="unipruning-aot-")
    if args.device_check:
        return device_check(args.device_check)
    doc = document(collect(args.workers, args.only))
    bad = [f"{r['kernel']} [{r['variant']}] {r['arch']}: {r['status']}" for r in doc["results"] if r["status"] != "ok"]
    bad += [f"{base}: data changed the compiled variant ({n} variants)" for base, n in recompiles(doc).items()]
    if args.only:
        print(table(doc))
    elif args.check:
        committed = json.load(open(args.out)) if os.path.isfile(args.out) else None
        if committed is None or stable(committed) != stable(doc):
            print(f"aot_compile: {os.path.relpath(args.out, ROOT)} is not what the kernels compile to: run "
                  "`python benchmarks/aot_compile.py` and commit it", file=sys.stderr)
            return 1
    else:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    print(f"aot_compile: {len(doc['results'])} compiles ({len(doc['results']) // len(ARCHS)} variants x "
          f"{len(ARCHS)} archs), {len(bad)} not ok")
    for line in bad:
        print("  " + line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
