"""What both packed formats share (checkpoint.py: 2:4, fp8.py: FP8 + 2:4): the index, config.json's entry,
and the model assembled from a packed checkpoint's shards."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from torch import nn

from ..errors import UsageError
from ..io.checkpoint import (
    SAFE_INDEX,
    LazyCheckpoint,
    assign,
    check_counts,
    empty_model,
    load_config,
    shard_headers,
)
from ..io.staging import write_json
from ..models import copy_stored, model_matrices, resolve_stored, stored_name


def packable(model_dir: str) -> tuple[object, set[str]]:
    """(config, stored names of the matrices a packer may pack): whole nn.Linear weights, fused ones
    included; MoE experts are 3-D parameters in the model, which neither packed tensor represents."""
    config = load_config(model_dir)
    return config, {m.stored for m in LazyCheckpoint(model_dir, config).matrices if m.expert is None}


def write_index(model_dir: str, staging: str, index: dict[str, str]) -> None:
    if os.path.isfile(os.path.join(model_dir, SAFE_INDEX)):
        with open(os.path.join(model_dir, SAFE_INDEX)) as f:
            source_index = json.load(f)
        source_index["weight_map"] = dict(sorted(index.items()))
        write_json(os.path.join(staging, SAFE_INDEX), source_index)


def existing_sparsity_config(model_dir: str) -> dict | None:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f).get("sparsity_config")


def add_config_entry(path: str, entry: dict, dtype: torch.dtype | None, key: str) -> None:
    with open(path) as f:
        config = json.load(f)
    if config.get("sparsity_config") is None:
        config.pop("sparsity_config", None)
    config[key] = entry
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    write_json(path, config)


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


def fill_model(model_dir: str, config, dtype: torch.dtype, packed: set[str], suffix: str, device: torch.device,
               packed_weight) -> nn.Module:
    """The meta-device model of `config` filled from a packed checkpoint: each packed matrix (stored as
    NAME + `suffix` and companions) becomes `packed_weight(handle, NAME)`, every other tensor is copied
    to `device` (experts stored one by one into slices of their 3-D parameter); ties restored, buffers
    moved to `device`."""
    headers = shard_headers(model_dir)
    check_counts(config, {key: shape for key, (_, _, shape) in headers.items()})  # before any skeleton
    model = empty_model(config, dtype)
    shard_of = {key: shard for key, (shard, _, _) in headers.items()}
    whole, slices = _destinations(model, config, packed, shard_of, device)
    for shard in dict.fromkeys(shard_of.values()):
        with safe_open(os.path.join(model_dir, shard), framework="pt") as handle:
            for key in (k for k, s in shard_of.items() if s == shard):
                if key.endswith(suffix) and key.removesuffix(suffix) in packed:
                    assign(model, key.removesuffix(suffix), packed_weight(handle, key.removesuffix(suffix)))
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
