"""Packed 2:4 checkpoints: `unipruning pack` writes them, `load_packed` rebuilds a sparse model from them.

A packed checkpoint is the Hugging Face directory of a 2:4-pruned model in which every 2:4-valid
prunable matrix `X.weight` (m, k) is stored as `X.weight_packed` (m, k/2, the kept values) and
`X.weight_meta` (m, k/16 int16, CUTLASS metadata; see packing.py): 9/16 of the dense bytes. Every
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

from ..errors import UsageError
from ..io.checkpoint import SAFE_INDEX, LazyCheckpoint, assign, empty_model, load_config, shard_headers, weight_shards
from ..io.staging import preflight, write_json, writing
from ..io.writer import copy_side_files
from ..models import copy_stored, model_matrices, resolve_stored, stored_name
from .formats import (
    LAYOUTS,
    PACKABLE_DTYPES,
    cutlass_tensor,
    pack_24,
    pack_cutlass_torch,
    skip_reason,
    unpack_cutlass_torch,
)

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


def _write_index(model_dir: str, staging: str, index: dict[str, str]) -> None:
    if os.path.isfile(os.path.join(model_dir, SAFE_INDEX)):
        with open(os.path.join(model_dir, SAFE_INDEX)) as f:
            source_index = json.load(f)
        source_index["weight_map"] = dict(sorted(index.items()))
        write_json(os.path.join(staging, SAFE_INDEX), source_index)


def pack_checkpoint(model_dir: str, out: str, dtype: str = "auto", overwrite: bool = False) -> dict:
    """`unipruning pack`: write the packed checkpoint of a 2:4-pruned model directory to `out`."""
    start = time.perf_counter()
    if dtype not in _DTYPES:
        raise UsageError(f"`dtype`: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    config = load_config(model_dir)
    # whole nn.Linear weights (fused ones included); MoE experts are 3-D parameters in the model, which
    # PyTorch's semi-structured tensors cannot represent: they stay dense
    prunable = {m.stored for m in LazyCheckpoint(model_dir, config).matrices if m.expert is None}
    preflight(out, overwrite, {"model_dir": model_dir})
    target, found, index = _DTYPES[dtype], _Packed(), {}
    with writing(out, overwrite, {"model_dir": model_dir}) as staging:
        for shard in weight_shards(model_dir):
            with safe_open(os.path.join(model_dir, shard), framework="pt") as handle:
                metadata = handle.metadata() or {"format": "pt"}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            written = found.pack_shard(tensors, prunable, target)
            save_file(written, os.path.join(staging, shard), metadata=metadata)
            index.update(dict.fromkeys(written, shard))
        if not found.packed:
            first = next(iter(found.dense.items()), ("", "no prunable matrices"))
            raise UsageError(f"`model_dir`: no 2:4 matrix to pack (e.g. {first[0]}: {first[1]})")
        _write_index(model_dir, staging, index)
        dtype_name = str(found.dtype).removeprefix("torch.")
        entry = {"format_version": FORMAT_VERSION, "layout": "cutlass", "dtype": dtype_name,
                 "packed": sorted(found.packed), "dense": dict(sorted(found.dense.items()))}
        copy_side_files(model_dir, staging, _existing_sparsity_config(model_dir))
        _add_config_entry(os.path.join(staging, "config.json"), entry, target)
        report = {
            "command": "pack", "model": os.path.abspath(model_dir), "layout": "cutlass", "dtype": dtype_name,
            "packed_matrices": len(found.packed), "dense_matrices": found.dense,
            "packed_matrix_bytes_dense": found.bytes_dense, "packed_matrix_bytes": found.bytes_packed,
            "packed_fraction": found.bytes_packed / found.bytes_dense, "wall_seconds": time.perf_counter() - start,
        }
        write_json(os.path.join(staging, REPORT), report)
    return report


def _existing_sparsity_config(model_dir: str) -> dict | None:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f).get("sparsity_config")


def _add_config_entry(path: str, entry: dict, dtype: torch.dtype | None) -> None:
    with open(path) as f:
        config = json.load(f)
    if config.get("sparsity_config") is None:
        config.pop("sparsity_config", None)
    config[CONFIG_KEY] = entry
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    write_json(path, config)


def _packed_entry(model_dir: str):
    """(config, its `unipruning_packed` entry) of a packed checkpoint, or a one-line error."""
    config = load_config(model_dir)
    entry = getattr(config, CONFIG_KEY, None)
    if not isinstance(entry, dict) or entry.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"`model_dir`: {model_dir} is not a packed checkpoint of format version {FORMAT_VERSION} "
                         "(write one with `unipruning pack`)")
    return config, entry


def _destinations(model: nn.Module, config, packed: set[str], shard_of: dict[str, str], device: torch.device):
    """Where each stored tensor goes: ({stored name: whole parameter}, {stored name: expert matrices}).
    A whole parameter has its own name or the family's rename; MoE checkpoints store experts one by one
    (never packed) and they are copied into slices of a 3-D parameter, given real storage here."""
    params = dict(model.named_parameters())
    whole = {stored_name(config, name, shard_of): name for name in params if name not in packed}
    whole.pop(None, None)
    experts = [m for m in model_matrices(config) if m.expert is not None and m.param not in whole.values()]
    slices: dict[str, list] = {}
    for m in resolve_stored(experts, config, shard_of):
        slices.setdefault(m.stored, []).append(m)
    for name in {m.param for m in experts}:
        assign(model, name, torch.empty(params[name].shape, dtype=params[name].dtype, device=device))
    return whole, slices


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
    compute capability 8.0+; on a CPU the model is built (for inspection) but cannot run forward."""
    if layout not in LAYOUTS:
        raise UsageError(f"`layout`: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    config, entry = _packed_entry(model_dir)
    device = torch.device(device)
    model = empty_model(config, getattr(torch, entry["dtype"]))
    packed = set(entry["packed"])
    shard_of = {key: shard for key, (shard, _, _) in shard_headers(model_dir).items()}
    whole, slices = _destinations(model, config, packed, shard_of, device)
    for shard in dict.fromkeys(shard_of.values()):
        with safe_open(os.path.join(model_dir, shard), framework="pt") as handle:
            for key in (k for k, s in shard_of.items() if s == shard):
                if key.endswith(PACKED_SUFFIX) and key.removesuffix(PACKED_SUFFIX) in packed:
                    name = key.removesuffix(PACKED_SUFFIX)
                    assign(model, name, _packed_weight(handle, name, device, layout))
                elif key in whole:
                    assign(model, whole[key], handle.get_tensor(key).to(device))
                elif key in slices:
                    tensor = handle.get_tensor(key)
                    for m in slices[key]:
                        copy_stored(model.get_parameter(m.param), m, tensor)
    if any(p.is_meta for p in model.parameters()):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UsageError(f"`model_dir`: the packed checkpoint lacks {missing[0]!r}")
    for module in model.modules():  # rebuilt on the CPU: move the computed buffers to `device`
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    return model
