"""The report of a job (`pruning_report.json`), typed, and the printers of the CLI and the demo.

`Report` has one field per entry a job may write; `to_dict()` leaves out the entries a job did not set
(an in-memory prune has no paths, a mask job no calibration...). The JSON is sorted by key.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from dataclasses import asdict, dataclass, field, fields, is_dataclass

import torch

REPORT = "pruning_report.json"


class _Unset:
    """The value of an entry a job did not set (None is a value: a git hash outside a checkout)."""

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET = _Unset()


@dataclass
class Totals:
    prunable_params: int
    prunable_kept: int
    sparsity: float
    dense_params: int
    pruned_params: int
    nm_valid: bool | None

    @classmethod
    def of(cls, matrices: dict[str, dict], dense_params: int) -> Totals:
        """From the per-matrix statistics (algorithm.masks.mask_stats) and the model's parameter count."""
        numel = sum(m["numel"] for m in matrices.values())
        kept = sum(m["kept"] for m in matrices.values())
        nm_flags = [m["nm_valid"] for m in matrices.values() if m["nm_valid"] is not None]
        return cls(prunable_params=numel, prunable_kept=kept, sparsity=1 - kept / numel if numel else 0.0,
                   dense_params=dense_params, pruned_params=dense_params - (numel - kept),
                   nm_valid=all(nm_flags) if nm_flags else None)


@dataclass
class Report:
    """What a job did. blocks: per decoder block {block, seconds, matrices, resumed[, write_seconds]};
    matrices: per matrix {shape, numel, kept, sparsity, nm_valid}; the rest as named."""

    command: str | None = UNSET
    model: str | None = UNSET
    saliency: str | None = UNSET
    settings: dict = field(default_factory=dict)
    targeting: dict | None = UNSET
    calibration: dict | None = UNSET
    processes: int | None = UNSET
    rank: int | None = UNSET
    weights_written: str | None = UNSET
    blocks: list[dict] | None = UNSET
    feedback: dict | None = UNSET
    calibration_seconds: float | None = UNSET
    unseen_matrices: dict | None = UNSET
    reconstruction: dict | None = UNSET
    mask: dict | None = UNSET
    matrices: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] | None = UNSET
    total: Totals | None = UNSET
    peak_memory: dict | None = UNSET
    versions: dict | None = UNSET
    git_hash: str | None = UNSET
    open_seconds: float | None = UNSET  # mask: reading the model's config, headers and the saliency
    cut_seconds: float | None = UNSET  # mask: cutting the masks and writing the checkpoint
    wall_seconds: float | None = UNSET

    def to_dict(self) -> dict:
        """The JSON form: every entry that was set."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not UNSET:
                out[f.name] = asdict(value) if is_dataclass(value) else value
        return out


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "safetensors", "triton", "datasets", "tokenizers"):
        try:
            found[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional package
            found[pkg] = None
    from ..version import __version__

    found["unipruning"] = __version__
    return found


def git_hash() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=True)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - not a git checkout, or no git
        return None


def proc_bytes(path: str, key: str) -> int | None:
    """A `key: N kB` entry of a Linux /proc file (/proc/self/status, /proc/meminfo) in bytes, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM on Linux. Not ru_maxrss: across fork/vfork + exec,
    Linux carries the parent's high-water mark into the child's ru_maxrss, so a process started by a
    large parent (a test runner that just built a checkpoint) would report the parent's peak."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory() -> dict[str, int | None]:
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"cpu_max_rss_bytes": peak_rss_bytes(), "gpu_max_allocated_bytes": gpu}


# ------------------------------------------------------------------------------------------ printers
def print_block_table(report: Report) -> None:
    """Per-block summary: matrices, kept fraction, calibration and reconstruction time."""
    by_block: dict[int, list[dict]] = {}
    for name, stats in report.matrices.items():
        block = int(next(p for p in name.split(".") if p.isdigit()))
        by_block.setdefault(block, []).append(stats)
    calib = {b["block"]: b["seconds"] for b in report.blocks or []}
    recon = {b["block"]: b["seconds"] for b in (report.reconstruction or {}).get("blocks", [])}
    print(f"{'block':>5} {'matrices':>8} {'params':>12} {'sparsity':>9} {'calib s':>8} {'recon s':>8}")
    for block, mats in sorted(by_block.items()):
        numel = sum(m["numel"] for m in mats)
        kept = sum(m["kept"] for m in mats)
        times = "".join(f" {t[block]:>8.2f}" if block in t else f" {'-':>8}" for t in (calib, recon))
        print(f"{block:>5} {len(mats):>8} {numel:>12,} {1 - kept / numel:>9.4f}{times}")


def print_summary(report: Report) -> None:
    total = report.total
    line = (f"sparsity {total.sparsity:.4f} of {total.prunable_params:,} prunable weights "
            f"({report.mask['pattern']}, allocation {report.mask['allocation']}); "
            f"parameters {total.dense_params:,} dense -> {total.pruned_params:,} non-pruned")
    if total.nm_valid is not None:
        line += f"; N:M valid: {total.nm_valid}"
    print(line)
    cut = "" if report.cut_seconds is UNSET else (f" (masks cut and written in {report.cut_seconds:.1f} s; the "
                                                   f"model and saliency opened in {report.open_seconds:.1f} s)")
    print(f"wall time {report.wall_seconds:.1f} s{cut}, peak RSS "
          f"{report.peak_memory['cpu_max_rss_bytes'] / 2**30:.2f} GiB")


@dataclass
class DryRun:
    """The plan of `prune --dry-run`: every prunable matrix with its planned sparsity and pattern (or why it
    is skipped), and the memory and time estimate with the throughputs it assumed."""

    model: str
    settings: dict
    matrices: list[dict]
    pruned: int
    skipped: int
    prunable_params: int
    pruned_params_after: int
    estimate: dict
    command: str = "dry-run"

    def to_dict(self) -> dict:
        return asdict(self)


def print_dry_run(plan: DryRun) -> None:
    """The dry-run plan: one line per matrix, then the estimate."""
    for m in plan.matrices:
        what = f"skip ({m['skipped']})" if "skipped" in m else f"{m['pattern']} sparsity {m['sparsity']:.4f}"
        print(f"{m['name']:<64} {'x'.join(map(str, m['shape'])):>12}  {what}")
    est = plan.estimate
    mem = est["memory"]
    print(f"{plan.pruned} matrices pruned, {plan.skipped} skipped; parameters {plan.prunable_params:,} prunable")
    print(f"estimate on {est['device']} ({est['dtype']}): peak memory ~{mem['total_bytes'] / 2**30:.2f} GiB "
          f"({mem['what']}), time ~{est['seconds']:.1f} s ({est['note']})")
    print("dry run: nothing written")
