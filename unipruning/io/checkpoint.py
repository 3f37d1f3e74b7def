"""Reading a Hugging Face checkpoint directory: config and tokenizer with one-line errors, the safetensors
shard headers (read once), tensors on demand, and the model's skeleton with one block at a time real.

`LazyCheckpoint` never holds more than it was asked for: each read opens the shard, copies the tensors
out and closes it, so no file mapping stays open. `skeleton()` builds the causal LM with its parameters
on the meta device (computed buffers, such as rotary frequencies, are real) and everything outside the
decoder blocks loaded; `load_block`/`release_block` give one block real storage on a device and take it
away again: a model is never resident as a whole.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import torch
from safetensors import safe_open
from torch import nn

from ..errors import UsageError
from ..lazy import LazyMapping
from ..models import copy_stored, decoder_blocks, family_for, model_matrices, piece, resolve_stored, stored_name

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DENSE_DTYPES = ("F32", "F16", "BF16")


def load_config(model_dir: str, trust_remote_code: bool = False):
    """The transformers config of a model directory, with a one-line error for anything else: not a
    model directory, custom code without trust_remote_code, a quantized or FP8 checkpoint, an
    architecture without a family table."""
    from transformers import AutoConfig

    if not os.path.isdir(model_dir):
        raise UsageError(f"`model_dir`: {model_dir!r} is not a directory")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(f"`model_dir`: {model_dir!r} has no config.json (not a Hugging Face model directory)")
    with open(os.path.join(model_dir, "config.json")) as f:
        try:
            raw = json.load(f)
        except ValueError as exc:
            raise UsageError(f"`model_dir`: {model_dir}/config.json is not valid JSON ({exc})") from None
    if raw.get("auto_map") and not trust_remote_code:
        raise UsageError(f"`model_dir`: {model_dir} ships its own modelling code (auto_map); it is not run unless "
                         "you pass `trust_remote_code`")
    if raw.get("quantization_config") is not None:
        quant = raw["quantization_config"]
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise UsageError(f"`model_dir`: {model_dir} is a quantized checkpoint ({method}); unipruning needs dense "
                         "fp16/bf16/fp32 weights")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise UsageError(f"`model_dir`: cannot read {model_dir}/config.json: {str(exc).splitlines()[0]}") from exc
    family_for(config)
    return config


def load_model(model_dir: str, dtype: torch.dtype, trust_remote_code: bool = False, device_map=None):
    """The causal LM of a directory on the CPU (or where `device_map` puts it, through accelerate), in
    `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    extra = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    model.eval()
    return model


def load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 - missing or unreadable tokenizer files
        raise UsageError(f"no usable tokenizer in {directory!r} (pass `tokenizer_dir`): "
                         f"{str(exc).splitlines()[0][:200]}") from exc


def weight_shards(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint (sharded or single), or a one-line error."""
    index = os.path.join(model_dir, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.isfile(os.path.join(model_dir, SAFE_SINGLE)):
        return [SAFE_SINGLE]
    raise UsageError(f"`model_dir`: {model_dir!r} has no safetensors weights (re-save it with save_pretrained to "
                     "convert)")


def shard_headers(model_dir: str) -> dict[str, tuple[str, str, list[int]]]:
    """{tensor name: (shard file, safetensors dtype, shape)} of every tensor of a checkpoint, from the
    shard headers (no tensor data is read)."""
    headers = {}
    for shard in weight_shards(model_dir):
        with safe_open(os.path.join(model_dir, shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                info = handle.get_slice(key)
                headers[key] = (shard, info.get_dtype(), list(info.get_shape()))
    return headers


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` with its parameters on the meta device (no memory) but real buffers:
    computed buffers (rotary inverse frequencies, Gemma's embedding scale) are not in checkpoints and
    must come from the constructors. accelerate moves each parameter to meta as it is registered, so
    only one parameter's uninitialised storage exists at a time (transformers' own loaders do the same)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make `tensor` the parameter `name` of `model` (no gradient)."""
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name)._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


class LazyCheckpoint:
    """A checkpoint's tensors read on demand from its safetensors shards; the headers are read once.

    shard_of: {tensor name: shard file}; header: {tensor name: (safetensors dtype, shape)}; matrices:
    every prunable matrix (models.Matrix) with where the checkpoint stores it."""

    def __init__(self, model_dir: str, config):
        self.model_dir, self.config = model_dir, config
        headers = shard_headers(model_dir)
        self.shard_of = {name: shard for name, (shard, _, _) in headers.items()}
        self.header = {name: (dtype, shape) for name, (_, dtype, shape) in headers.items()}
        self.matrices = resolve_stored(model_matrices(config), config, self.shard_of)
        self.matrix = {m.name: m for m in self.matrices}
        first = self.matrices[0].stored
        if (dtype := self.header[first][0]) not in DENSE_DTYPES:
            raise UsageError(f"`model_dir`: {first} is stored as {dtype}; unipruning needs dense fp16/bf16/fp32 "
                             "weights (FP8 and integer-quantized checkpoints are refused)")

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.header.values())

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m.name: m.shape for m in self.matrices}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.shard_of[name], []).append(name)
        out = {}
        for shard, keys in by_shard.items():
            with safe_open(os.path.join(self.model_dir, shard), framework="pt") as handle:
                for key in keys:
                    out[key] = handle.get_tensor(key)
        return out

    def read_matrix(self, name: str) -> torch.Tensor:
        """One prunable matrix (logical name) in the stored dtype, read from its checkpoint tensor."""
        m = self.matrix[name]
        return piece(self.read([m.stored])[m.stored], m.stored_expert, m.stored_rows)

    def lazy(self, names: list[str]) -> Mapping[str, torch.Tensor]:
        """The named matrices as a mapping that reads each one when it is looked up (nothing kept)."""
        return LazyMapping(names, self.read_matrix)

    def skeleton(self, dtype: torch.dtype) -> nn.Module:
        """The causal LM on the meta device, its non-block tensors loaded on the CPU in `dtype`."""
        model = empty_model(self.config, dtype)
        blocks_prefix = family_for(self.config).blocks + "."
        outside = {n: p for n, p in model.named_parameters() if not n.startswith(blocks_prefix)}
        for name, tensor in self.read([n for n in outside if n in self.shard_of]).items():
            assign(model, name, tensor.to(dtype))
        if any(p.is_meta for n, p in model.named_parameters() if not n.startswith(blocks_prefix)):
            model.tie_weights()  # e.g. lm_head stored once, as the embedding
        missing = [n for n, p in model.named_parameters() if not n.startswith(blocks_prefix) and p.is_meta]
        if missing:
            raise UsageError(f"`model_dir`: the checkpoint lacks {missing[0]!r}")
        return model

    def _block_sources(self, block: nn.Module, index: int) -> tuple[dict[str, str], dict[str, list]]:
        """({parameter: its stored tensor}, {parameter: the matrices it is assembled from}) of block `index`."""
        prefix = f"{family_for(self.config).blocks}.{index}."
        whole, pieces = {}, {}
        for name, _ in block.named_parameters():
            stored = stored_name(self.config, prefix + name, self.shard_of)
            if stored is not None:
                whole[name] = stored
                continue
            pieces[name] = [m for m in self.matrices if m.block == index and m.param == prefix + name]
            if not pieces[name]:
                raise UsageError(f"`model_dir`: the checkpoint lacks {prefix + name!r}")
        return whole, pieces

    def load_block(self, model: nn.Module, index: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
        block = decoder_blocks(model)[index]
        whole, pieces = self._block_sources(block, index)
        tensors = self.read([*whole.values(), *(m.stored for ms in pieces.values() for m in ms)])
        for module in block.modules():  # real storage for the parameters; computed buffers move along
            for key, p in module._parameters.items():
                if p is not None:
                    module._parameters[key] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                           requires_grad=False)
        block.to(device)
        with torch.no_grad():
            for name, param in block.named_parameters():
                if name in whole:
                    param.copy_(tensors[whole[name]].to(dtype))
                    continue
                for m in pieces[name]:  # MoE experts stored per expert: gate and up rows, down
                    copy_stored(param, m, tensors[m.stored])
        return block

    @staticmethod
    def release_block(model: nn.Module, index: int) -> None:
        for module in decoder_blocks(model)[index].modules():
            for key, p in module._parameters.items():
                if p is not None:
                    module._parameters[key] = nn.Parameter(p.to("meta"), requires_grad=False)
            for key, b in module._buffers.items():  # the computed buffers (small) stay real
                if b is not None:
                    module._buffers[key] = b.to("cpu")
