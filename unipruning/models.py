"""Model families: where the decoder blocks are and which linears inside them are prunable.

Explicit tables, no tracing. A family lists its `model_type`s, the attribute path of the decoder block
list and, per block, the prunable linears in a fixed order. Embeddings, lm_head, norms, biases are
never prunable (SPEC section 2).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError

_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


# linears that read the same input, in the order a block computes them: weight reconstruction
# (SPEC section 9) updates a group, then collects the next group's input from the updated block
_LLAMA_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # attribute path of the decoder block list, from the causal-LM module
    linears: tuple[str, ...]  # prunable linears inside one block
    sequential: tuple[tuple[str, ...], ...]  # the linears grouped by shared input, in compute order


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2"), "model.layers", _LLAMA_LINEARS, _LLAMA_SEQUENTIAL),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UsageError(
        f"unsupported architecture {model_type!r}: supported model types are {', '.join(supported_model_types())}"
    )


def num_blocks(config) -> int:
    return int(config.num_hidden_layers)


def prunable_names(config) -> list[str]:
    """Parameter names of the prunable matrices, block by block, in the family's linear order."""
    family = family_for(config)
    return [
        f"{family.blocks}.{i}.{linear}.weight" for i in range(num_blocks(config)) for linear in family.linears
    ]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    blocks = model.get_submodule(family_for(model.config).blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise UsageError(f"model has no decoder block list at {family_for(model.config).blocks!r}")
    return blocks


def block_linears(model: nn.Module, index: int) -> dict[str, nn.Linear]:
    """{parameter name: nn.Linear} of the prunable linears of block `index`."""
    family = family_for(model.config)
    block = decoder_blocks(model)[index]
    found = {}
    for linear in family.linears:
        module = block.get_submodule(linear)
        if not isinstance(module, nn.Linear):
            raise UsageError(f"{family.blocks}.{index}.{linear} is not an nn.Linear")
        found[f"{family.blocks}.{index}.{linear}.weight"] = module
    return found


def fingerprint(config, shapes: dict[str, tuple[int, ...]]) -> str:
    """A stable hash of a model's architecture and prunable tensor names/shapes.

    Independent of dtype, transformers version and paths, so the saliency of a model stays valid for
    the same model saved again; a different model or a resized one gets another fingerprint.
    """
    keys = (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
    )
    arch = {k: getattr(config, k, None) for k in keys}
    payload = json.dumps({"arch": arch, "tensors": sorted((n, list(s)) for n, s in shapes.items())})
    return hashlib.sha256(payload.encode()).hexdigest()


def check_nm_divisible(shapes: dict[str, tuple[int, ...]], m: int) -> None:
    for name, shape in shapes.items():
        if shape[-1] % m:
            raise UsageError(
                f"{name}: in_features {shape[-1]} is not divisible by M={m}, so it cannot be pruned N:{m}"
            )


# --------------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------------
def load_config(model_dir: str):
    """The transformers config of a model directory, with a one-line error for anything else."""
    from transformers import AutoConfig

    if not os.path.isdir(model_dir):
        raise UsageError(f"--model: {model_dir!r} is not a directory")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(f"--model: {model_dir!r} has no config.json (not a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise UsageError(f"--model: cannot read {model_dir}/config.json: {str(exc).splitlines()[0]}") from exc
    if getattr(config, "quantization_config", None) is not None:
        raise UsageError(f"--model: {model_dir} is a quantized checkpoint; unipruning needs dense weights")
    family_for(config)
    return config


def resolve_dtype(name: str, config, device: torch.device) -> torch.dtype:
    """--dtype auto: the checkpoint's dtype on a GPU, float32 on a CPU (half-precision CPU matmuls are
    slow and, for float16, lossy)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def load_model(model_dir: str, dtype: torch.dtype):
    """The causal LM of a directory on the CPU, in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model
