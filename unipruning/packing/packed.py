"""Packed 2:4 checkpoints: `unipruning pack` writes them, `load_packed` rebuilds a sparse model from them.

A packed checkpoint is the Hugging Face directory of a 2:4-pruned model in which every 2:4-valid
prunable matrix `X.weight` (m, k) is stored as `X.weight_packed` (m, k/2, the kept values) and
`X.weight_meta` (m, k/16 int16, CUTLASS metadata; see formats.py): 9/16 of the dense bytes. Every
other tensor is copied unchanged (cast only with --dtype). config.json gains an entry
`unipruning_packed` {format_version, layout, dtype, packed: [names], dense: {name: reason}}. Plain
`from_pretrained` cannot read it (the packed weights are not dense tensors): `load_packed` can.

The CUTLASS layout is stored because it is documented and portable; cuSPARSELt's is version-dependent,
so `load_packed(..., layout="cusparselt")` compresses each layer on the GPU when it is loaded (through a
transient dense copy of that one layer).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import check_flag
from ..errors import UsageError
from ..files import read_regular
from ..io.checkpoint import load_config, weight_shards
from ..io.staging import preflight, write_json, writing
from ..io.writer import copy_side_files
from ..progress import Progress, bar_of
from .assemble import add_config_entry, existing_sparsity_config, fill_model, packable, write_index
from .formats import (
    LAYOUTS,
    PACKABLE_DTYPES,
    cutlass_tensor,
    pack_24,
    pack_cutlass_torch,
    skip_reason,
    sparse_device_problem,
    unpack_cutlass_torch,
)
from .fp8 import CONFIG_KEY as FP8_KEY
from .fp8 import load_fp8_24

FORMAT_VERSION = 1
CONFIG_KEY = "unipruning_packed"
PACKED_SUFFIX, META_SUFFIX = "_packed", "_meta"
REPORT = "packing_report.json"
_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Packed:
    """What packing found so far: packed matrices, those kept dense (and why), dtype and bytes."""

    packed: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    bytes_dense: int = 0
    bytes_packed: int = 0

    def pack_shard(self, tensors: dict[str, torch.Tensor], prunable: set[str], target) -> dict[str, torch.Tensor]:
        """The tensors of one shard as they are stored packed: 2:4 matrices as values and metadata."""
        written = {}
        for name, tensor in tensors.items():
            if target is not None and tensor.is_floating_point():
                tensor = tensor.to(target)
            if name in prunable and tensor.dtype not in PACKABLE_DTYPES:
                raise UsageError(f"`model_dir`: weights are {tensor.dtype}; 2:4 packing needs float16 or "
                                 "bfloat16 (pass `dtype` bfloat16 or float16)")
            reason = skip_reason(tensor) if name in prunable else "not prunable"
            if reason is not None:
                written[name] = tensor
                if name in prunable:
                    self.dense[name] = reason
                continue
            values, meta = pack_cutlass_torch(tensor.contiguous())
            written[name + PACKED_SUFFIX], written[name + META_SUFFIX] = values, meta
            self.packed.append(name)
            self.dtype = tensor.dtype
            self.bytes_dense += tensor.numel() * tensor.element_size()
            self.bytes_packed += values.numel() * values.element_size() + meta.numel() * meta.element_size()
        return written


def pack_checkpoint(model_dir: str, out: str, dtype: str = "auto", overwrite: bool = False,
                    progress: Progress | None = None) -> dict:
    """`unipruning pack`: write the packed checkpoint of a 2:4-pruned model directory to `out` (a bar of
    its shards with `progress`)."""
    start = time.perf_counter()
    if dtype not in _DTYPES:
        raise UsageError(f"`dtype`: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    check_flag("overwrite", overwrite)
    _, prunable = packable(model_dir)
    preflight(out, overwrite, {"model_dir": model_dir})
    target, found, index = _DTYPES[dtype], _Packed(), {}
    shards = weight_shards(model_dir)
    with writing(out, overwrite, {"model_dir": model_dir}) as staging, \
            bar_of(progress, len(shards), "pack", "shard") as bar:
        for shard in shards:
            with safe_open(os.path.join(model_dir, shard), framework="pt") as handle:
                metadata = handle.metadata() or {"format": "pt"}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            written = found.pack_shard(tensors, prunable, target)
            save_file(written, os.path.join(staging, shard), metadata=metadata)
            index.update(dict.fromkeys(written, shard))
            bar.update(1)
        if not found.packed:
            first = next(iter(found.dense.items()), ("", "no prunable matrices"))
            raise UsageError(f"`model_dir`: no 2:4 matrix to pack (e.g. {first[0]}: {first[1]})")
        write_index(model_dir, staging, index)
        dtype_name = str(found.dtype).removeprefix("torch.")
        entry = {"format_version": FORMAT_VERSION, "layout": "cutlass", "dtype": dtype_name,
                 "packed": sorted(found.packed), "dense": dict(sorted(found.dense.items()))}
        copy_side_files(model_dir, staging, existing_sparsity_config(model_dir))
        add_config_entry(os.path.join(staging, "config.json"), entry, target, CONFIG_KEY)
        report = {
            "command": "pack", "model": os.path.abspath(model_dir), "layout": "cutlass", "dtype": dtype_name,
            "packed_matrices": len(found.packed), "dense_matrices": found.dense,
            "packed_matrix_bytes_dense": found.bytes_dense, "packed_matrix_bytes": found.bytes_packed,
            "packed_fraction": found.bytes_packed / found.bytes_dense, "wall_seconds": time.perf_counter() - start,
        }
        write_json(os.path.join(staging, REPORT), report)
    return report


def _packed_entry(model_dir: str):
    """(config, its `unipruning_packed` entry) of a packed checkpoint, or a one-line error."""
    config = load_config(model_dir)
    entry = getattr(config, CONFIG_KEY, None)
    if not isinstance(entry, dict) or entry.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"`model_dir`: {model_dir} is not a packed checkpoint of format version {FORMAT_VERSION} "
                         "(write one with `unipruning pack`)")
    return config, entry


def _packed_weight(handle, name: str, device: torch.device, layout: str) -> torch.Tensor:
    values = handle.get_tensor(name + PACKED_SUFFIX).to(device)
    meta = handle.get_tensor(name + META_SUFFIX).to(device)
    if layout == "cutlass":
        return cutlass_tensor(values, meta)
    return pack_24(unpack_cutlass_torch(values, meta), "cusparselt")


def load_packed(model_dir: str, device: str | torch.device = "cuda", layout: str = "cutlass") -> nn.Module:
    """The causal LM of a packed checkpoint, its 2:4 matrices as semi-structured tensors on `device`.

    No packed layer is ever made dense with layout "cutlass" (the stored format); "cusparselt"
    compresses each layer on the GPU through a transient dense copy. Sparse matmuls need a CUDA GPU of
    compute capability 8.0+: `device` "cuda" without one is a one-line UsageError. On a CPU the model is
    built for inspection only (its tensors, `unpack_24` of each packed weight): its forward raises a
    one-line UsageError instead of failing inside torch. An FP8 + 2:4 checkpoint (`pack --format fp8-2:4`)
    is handed to `fp8.load_fp8_24`."""
    if layout not in LAYOUTS:
        raise UsageError(f"`layout`: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"`device`: {device!r} is not a device ({str(exc).splitlines()[0][:80]})") from None
    if _is_fp8(model_dir):
        return load_fp8_24(model_dir, device)
    why = sparse_device_problem(device)
    if why is not None and (device.type == "cuda" or layout == "cusparselt"):
        raise UsageError(f"load_packed: {why}" + ("" if device.type == "cuda" else " (cuSPARSELt compresses there)"))
    config, entry = _packed_entry(model_dir)
    model = fill_model(model_dir, config, getattr(torch, entry["dtype"]), set(entry["packed"]), PACKED_SUFFIX, device,
                       lambda handle, name: _packed_weight(handle, name, device, layout))
    if why is not None:
        _inspection_only(model, why)
    return model


def _is_fp8(model_dir: str) -> bool:
    try:  # never blocks (a FIFO named config.json): load_config words the problem
        return FP8_KEY in json.loads(read_regular(os.path.join(model_dir, "config.json"), "model_dir", 1 << 26))
    except (UsageError, ValueError, RecursionError, TypeError):
        return False


def _inspection_only(model: nn.Module, why: str) -> None:
    """Make every packed layer's forward a one-line UsageError (a model built where it cannot run)."""
    message = (f"this model was loaded with load_packed on a device that cannot run it ({why}); load it with "
               "device='cuda'")

    def refuse(module, args):
        raise UsageError(message)

    for module in model.modules():
        if isinstance(getattr(module, "weight", None), torch.sparse.SparseSemiStructuredTensor):
            module.register_forward_pre_hook(refuse)
