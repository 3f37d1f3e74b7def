"""Outputs (SPEC section 7): the pruned checkpoint, the saliency directory, the report; all atomic.

The checkpoint is written from the SOURCE safetensors, tensor by tensor (one tensor in memory at a time),
one shard per decoder block (PrunedWriter): every tensor is copied as it is (same names, dtypes, shapes)
except the prunable matrices, which get +0.0 at the dropped entries (or their reconstructed values). So
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
MASK_STATS = ".mask-stats"  # PrunedWriter's per-shard mask statistics while a checkpoint is being written


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


def write_streamed(target: str, specs: list[tuple[str, str, list[int]]], produce: Callable[[str], torch.Tensor],
                   metadata: dict[str, str] | None = None, before_rename: Callable[[], None] | None = None) -> None:
    """Write the safetensors file `target` with the tensors `specs` ((name, safetensors dtype, shape), in
    order), each obtained from produce(name) only when it is written: one tensor in memory at a time, the
    header known up front. Written to a temporary name and renamed (after `before_rename`): the file is
    whole or absent."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata or {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(target + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in specs:
            tensor = produce(name)
            if tensor.dtype != _SAFETENSORS_DTYPES[dtype] or list(tensor.shape) != shape:
                raise ValueError(f"{name}: the produced tensor changed dtype or shape")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if before_rename is not None:
        before_rename()
    os.replace(target + ".tmp", target)


class PrunedWriter:
    """Writes a pruned checkpoint with one shard per decoder block, so that each block can be written as
    soon as its masks are known (during calibration: the pruned model is never assembled, and the
    source is read once), and a resumed run finds the finished blocks' shards in place.

    Layout: `model-00001-of-NNNNN.safetensors` holds every tensor outside the decoder blocks, shard b+2
    the tensors of block b, all under their source names, dtypes and shapes, plus the standard index.
    Prunable matrices (models.Matrix, at their stored places: whole tensors, rows of fused ones,
    per-expert tensors) get `pruned(name, weight)` -> (pruned weight, keep mask); every other tensor is
    copied bit for bit. The mask statistics of each shard's matrices go to a hidden side file, written
    before the shard is renamed into place and removed by `finish`."""

    def __init__(self, checkpoint, out_dir: str, matrices: list, nm_of: dict[str, tuple[int, int] | None]):
        from .models import family_for, num_blocks

        self.checkpoint, self.out_dir, self.nm_of = checkpoint, out_dir, nm_of
        self.blocks = num_blocks(checkpoint.config)
        self.parts = self.blocks + 1
        prefix = family_for(checkpoint.config).blocks + "."
        self.names: list[list[str]] = [[] for _ in range(self.parts)]  # stored names per shard
        for name in checkpoint.shard_of:
            head = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
            self.names[int(head) + 1 if head.isdigit() else 0].append(name)
        self.matrices = matrices
        self.inside: dict[str, list] = {}
        for m in matrices:
            self.inside.setdefault(m.stored, []).append(m)

    def shard(self, part: int) -> str:
        return os.path.join(self.out_dir, f"model-{part + 1:05d}-of-{self.parts:05d}.safetensors")

    def _stats_file(self, part: int) -> str:
        return os.path.join(self.out_dir, MASK_STATS, f"{part:05d}.json")

    def block_written(self, index: int) -> bool:
        return os.path.isfile(self.shard(index + 1))

    def _write(self, part: int, pruned) -> None:
        stats: dict[str, dict] = {}

        def produce(name: str) -> torch.Tensor:
            tensor = self.checkpoint.read([name])[name]
            if name not in self.inside:
                return tensor
            out = tensor.clone()
            for m in self.inside[name]:
                view = piece(out, m.stored_expert, m.stored_rows)
                weight, keep = pruned(m.name, view)
                view.copy_(weight)
                stats[m.name] = mask_stats(keep, self.nm_of[m.name])
            return out

        specs = [(n, *self.checkpoint.header[n]) for n in self.names[part]]
        os.makedirs(os.path.dirname(self._stats_file(part)), exist_ok=True)
        write_streamed(self.shard(part), specs, produce,
                       before_rename=lambda: write_json(self._stats_file(part), stats))

    def write_block(self, index: int, pruned) -> None:
        self._write(index + 1, pruned)

    def finish(self, pruned) -> dict[str, dict]:
        """Write the blocks not written yet and the shard of everything outside the blocks, then the
        index; return the per-matrix mask statistics, in the matrices' order."""
        for index in range(self.blocks):
            if not self.block_written(index):
                self.write_block(index, pruned)
        self._write(0, pruned)
        stats, weight_map, total = {}, {}, 0
        for part in range(self.parts):
            path = self.shard(part)
            with open(self._stats_file(part)) as f:
                stats.update(json.load(f))
            for name in self.names[part]:
                weight_map[name] = os.path.basename(path)
                dtype, shape = self.checkpoint.header[name]
                total += math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        write_json(os.path.join(self.out_dir, SAFE_INDEX), {"metadata": {"total_size": total},
                                                            "weight_map": weight_map})
        shutil.rmtree(os.path.join(self.out_dir, MASK_STATS))
        return {m.name: stats[m.name] for m in self.matrices}


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
