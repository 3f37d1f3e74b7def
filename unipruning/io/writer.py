"""Writing a pruned checkpoint from the SOURCE safetensors, tensor by tensor, one shard per decoder block.

Every tensor is copied as it is (same names, dtypes, shapes) except the prunable matrices, which get +0.0
at the dropped entries (or their reconstructed values). So non-prunable tensors are bit-identical and tied
embeddings stay tied (the source stores them once). Side files (config with its `sparsity_config`,
tokenizer, generation config, chat template, license) are copied beside.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open

from ..algorithm.masks import mask_stats
from ..models import family_for, num_blocks, piece
from .checkpoint import SAFE_INDEX, check_finite
from .staging import atomic_file, write_json

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = (SAFE_INDEX, "pytorch_model.bin.index.json")
MASK_STATS = ".mask-stats"  # PrunedWriter's per-shard mask statistics while a checkpoint is being written


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
    with atomic_file(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, dtype, shape in specs:
                tensor = produce(name)
                if tensor.dtype != _SAFETENSORS_DTYPES[dtype] or list(tensor.shape) != shape:
                    raise ValueError(f"{name}: the produced tensor changed dtype or shape")
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        if before_rename is not None:
            before_rename()


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
        """Whether a resumed run finds block `index`'s shard whole, with its statistics (an unreadable
        one, as a crash without a flushed disk leaves, is written again)."""
        part = index + 1
        try:
            with safe_open(self.shard(part), framework="pt") as handle:
                keys = set(handle.keys())
            with open(self._stats_file(part)) as f:
                json.load(f)
        except (OSError, ValueError, SafetensorError):
            return False
        return keys == set(self.names[part])

    def _write(self, part: int, pruned) -> None:
        stats: dict[str, dict] = {}

        def produce(name: str) -> torch.Tensor:
            tensor = self.checkpoint.read([name])[name]
            if name not in self.inside:
                return tensor
            out = tensor.clone()
            for m in self.inside[name]:
                view = piece(out, m.stored_expert, m.stored_rows)
                check_finite(m.name, view)  # mask reads the source here only: its scan rides on this read
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
