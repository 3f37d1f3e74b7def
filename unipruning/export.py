"""Outputs (SPEC section 7): the pruned checkpoint, the saliency directory, the report; all atomic.

The checkpoint is written from the SOURCE safetensors, shard by shard and tensor by tensor (one tensor
in memory at a time): every tensor is copied as it is (same names, dtype, shards and index) except the
prunable matrices, which get +0.0 at the dropped entries (or their reconstructed values). So
non-prunable tensors are bit-identical and tied embeddings stay tied (the source stores them once).
Outputs are staged in a hidden temporary directory next to --out and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open

from .errors import UsageError
from .masks import mask_stats
from .models import piece

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = (SAFE_INDEX, "pytorch_model.bin.index.json")


# ------------------------------------------------------------------------------------ directories
def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_out(out: str, overwrite: bool, sources: dict[str, str]) -> None:
    """Refuse an --out that would lose or clobber data: non-empty without --overwrite, a file, or
    equal to / inside / containing one of the inputs ({option: path})."""
    out_real = os.path.realpath(out)
    for option, path in sources.items():
        src = os.path.realpath(path)
        if _inside(out_real, src):
            raise UsageError(f"--out {out!r} must not be {option} or inside it")
        if _inside(src, out_real):
            raise UsageError(f"--out {out!r} must not contain {option} {path!r}")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {out!r} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise UsageError(f"--out {out!r} is not empty (pass --overwrite to replace it)")


def _commit(tmp: str, out: str) -> None:
    """Replace `out` by `tmp` in one rename (the old `out`, if any, is moved aside first and removed
    only after): the directory appears complete or not at all."""
    parent = os.path.dirname(out)
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out: str) -> Iterator[str]:
    """Yield a temporary directory next to `out`; on success it replaces `out`, on failure it is
    removed."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, out)


def partial_directory(out: str, run_key: str) -> str:
    """Where the run named `run_key` keeps its partial state: a hidden directory next to `out`."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial-{run_key[:16]}")


@contextlib.contextmanager
def resumable_directory(out: str, run_key: str, overwrite: bool) -> Iterator[str]:
    """Like `staged_directory`, but the directory's name is fixed by `run_key` (a hash of everything
    that decides the output) and it is kept when the run fails or is killed, so that the same command
    finds it again and resumes; `overwrite` discards it. On success it replaces `out`."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = partial_directory(out, run_key)
    if overwrite and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp, exist_ok=True)
    yield tmp
    _commit(tmp, out)


# ------------------------------------------------------------------------------------ checkpoints
def weight_shards(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint (sharded or single), or a one-line error."""
    index = os.path.join(model_dir, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.isfile(os.path.join(model_dir, SAFE_SINGLE)):
        return [SAFE_SINGLE]
    raise UsageError(
        f"--model: {model_dir!r} has no safetensors weights (re-save it with save_pretrained to convert)"
    )


def tensor_shapes(model_dir: str, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the named tensors, read from the shard headers (no data loaded)."""
    shapes = {}
    for shard in weight_shards(model_dir):
        with safe_open(os.path.join(model_dir, shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    missing = [n for n in names if n not in shapes]
    if missing:
        raise UsageError(f"--model: the checkpoint lacks prunable tensors, e.g. {missing[0]!r}")
    return {n: shapes[n] for n in names}


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _read_one(path: str, name: str) -> torch.Tensor:
    """One tensor copied out of a shard, the file closed again: no mapping of the shard stays resident."""
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor(name)


def stream_shard(source: str, target: str, transform: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Write `target` with the tensors of the safetensors file `source` (same names, dtypes, shapes,
    order and metadata), each replaced by transform(name, tensor), one tensor in memory at a time: the
    header is known from the source's, then the tensors are read, transformed and appended in turn."""
    with safe_open(source, framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        specs = [(k, handle.get_slice(k).get_dtype(), list(handle.get_slice(k).get_shape())) for k in handle.keys()]  # noqa: SIM118
    header, offset = {}, 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(target, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in specs:
            tensor = transform(name, _read_one(source, name))
            if tensor.dtype != _SAFETENSORS_DTYPES[dtype] or list(tensor.shape) != shape:
                raise ValueError(f"{name}: transform changed dtype or shape")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def write_pruned_weights(
    model_dir: str,
    out_dir: str,
    pruned: Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    matrices: list,
    nm_of: dict[str, tuple[int, int] | None],
) -> dict[str, dict]:
    """Copy every shard of `model_dir` to `out_dir` tensor by tensor (never a whole shard in memory),
    replacing each prunable matrix (models.Matrix, at its stored place: a whole tensor, rows of a fused
    one, or a per-expert tensor) by the first item of `pruned(name, weight)` -> (pruned weight, keep
    mask). Returns per-matrix statistics of the masks {name: {shape, numel, kept, sparsity, nm_valid}}."""
    inside: dict[str, list] = {}
    for m in matrices:
        inside.setdefault(m.stored, []).append(m)
    stats: dict[str, dict] = {}

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in inside:
            return tensor
        out = tensor.clone()
        for m in inside[name]:
            view = piece(out, m.stored_expert, m.stored_rows)
            weight, keep = pruned(m.name, view)
            view.copy_(weight)
            stats[m.name] = mask_stats(keep, nm_of[m.name])
        return out

    for shard in weight_shards(model_dir):
        stream_shard(os.path.join(model_dir, shard), os.path.join(out_dir, shard), transform)
    if os.path.isfile(os.path.join(model_dir, SAFE_INDEX)):
        shutil.copy2(os.path.join(model_dir, SAFE_INDEX), os.path.join(out_dir, SAFE_INDEX))
    return {m.name: stats[m.name] for m in matrices}


def copy_side_files(model_dir: str, out_dir: str, sparsity_config: dict) -> None:
    """config.json (with `sparsity_config`) and every other top-level file that is not a weight file:
    generation config, tokenizer files, chat template, license, model card."""
    for name in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, name)
        if not os.path.isfile(src) or name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEXES:
            continue
        if name == "config.json":
            with open(src) as f:
                config = json.load(f)
            config["sparsity_config"] = sparsity_config
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
        else:
            shutil.copy2(src, os.path.join(out_dir, name))


def count_parameters(model_dir: str) -> int:
    total = 0
    for shard in weight_shards(model_dir):
        with safe_open(os.path.join(model_dir, shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                numel = 1
                for d in handle.get_slice(key).get_shape():
                    numel *= d
                total += numel
    return total


# ------------------------------------------------------------------------------------------ report
def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "safetensors", "triton", "datasets", "tokenizers"):
        try:
            found[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional package
            found[pkg] = None
    from . import __version__

    found["unipruning"] = __version__
    return found


def git_hash() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - not a git checkout, or no git
        return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM on Linux. Not ru_maxrss: across fork/vfork + exec,
    Linux carries the parent's high-water mark into the child's ru_maxrss, so a process started by a
    large parent (a test runner that just built a checkpoint) would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory() -> dict[str, int | None]:
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"cpu_max_rss_bytes": peak_rss_bytes(), "gpu_max_allocated_bytes": gpu}


def summarize(matrices: dict[str, dict], dense_params: int) -> dict:
    numel = sum(m["numel"] for m in matrices.values())
    kept = sum(m["kept"] for m in matrices.values())
    nm_flags = [m["nm_valid"] for m in matrices.values() if m["nm_valid"] is not None]
    return {
        "prunable_params": numel,
        "prunable_kept": kept,
        "sparsity": 1 - kept / numel if numel else 0.0,
        "dense_params": dense_params,
        "pruned_params": dense_params - (numel - kept),
        "nm_valid": all(nm_flags) if nm_flags else None,
    }


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
