"""Model families: where the decoder blocks are and which linears inside them are prunable.

Explicit tables, no tracing. A family lists its `model_type`s, the attribute path of the decoder block
list and, per block, the prunable linears in a fixed order. Embeddings, lm_head, norms, biases and MoE
routers are never prunable (docs/method.md, "What is pruned").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import UsageError


# --------------------------------------------------------------------------------------------------
# Family tables
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fused:
    """A fused nn.Linear split into logical sub-matrices by output rows: Phi-3's
    qkv_proj -> q, k, v and gate_up_proj -> gate, up. `sizes(config)` gives each part's rows."""

    module: str
    parts: tuple[str, ...]
    sizes: Callable[[object], tuple[int, ...]]


@dataclass(frozen=True)
class Experts:
    """MoE experts stored by transformers v5 as 3-D parameters: gate_up_proj (E, 2I, H), whose rows are
    [gate; up], and down_proj (E, H, I). Each expert slice is its own matrix. `stored` gives the per-expert
    tensor names that checkpoints use on disk (transformers writes its legacy layout back), relative to
    the block, with {e} for the expert index; a checkpoint holding the 3-D tensors is read as is."""

    module: str
    stored: dict[str, str]  # part ("gate", "up", "down") -> stored name template


def _phi3_qkv(config) -> tuple[int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_attention_heads * head_dim, kv * head_dim, kv * head_dim


def _halves(config) -> tuple[int, int]:
    return config.intermediate_size, config.intermediate_size


Entry = str | Fused | Experts  # a plain nn.Linear (path in the block), a fused linear, or experts


@dataclass(frozen=True)
class Family:
    """model_types: config.model_type values; blocks: attribute path of the decoder block list from the
    causal-LM module; entries: the prunable linears of a block in compute order (an entry a block lacks
    is skipped: MoE configs mix dense and sparse blocks); renames: stored names of non-prunable block
    tensors that checkpoints keep under another name; sequential: the plain linears grouped by shared
    input, in compute order (weight reconstruction), None where reconstruction is not supported."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    entries: tuple[Entry, ...]
    sequential: tuple[tuple[str, ...], ...] | None
    renames: tuple[tuple[str, str], ...] = ()


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# linears that read the same input, in the order a block computes them: weight reconstruction
# updates a group, then collects the next group's input from the updated block
_LLAMA_SEQUENTIAL = (_ATTN[:3], _ATTN[3:], _MLP[:2], _MLP[2:])
_QWEN_EXPERTS = Experts("mlp.experts", {"gate": "mlp.experts.{e}.gate_proj.weight",
                                        "up": "mlp.experts.{e}.up_proj.weight",
                                        "down": "mlp.experts.{e}.down_proj.weight"})
_SHARED = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")

FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), "model.layers",
           _ATTN + _MLP, _LLAMA_SEQUENTIAL),
    Family("phi3", ("phi3",), "model.layers",
           (Fused("self_attn.qkv_proj", ("q", "k", "v"), _phi3_qkv), "self_attn.o_proj",
            Fused("mlp.gate_up_proj", ("gate", "up"), _halves), "mlp.down_proj"), None),
    Family("opt", ("opt",), "model.decoder.layers",
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",),
            ("fc2",))),
    Family("mixtral", ("mixtral",), "model.layers",
           (*_ATTN, Experts("mlp.experts", {"gate": "block_sparse_moe.experts.{e}.w1.weight",
                                            "up": "block_sparse_moe.experts.{e}.w3.weight",
                                            "down": "block_sparse_moe.experts.{e}.w2.weight"})),
           None, renames=(("mlp.gate.weight", "block_sparse_moe.gate.weight"),)),
    Family("qwen_moe", ("qwen2_moe", "qwen3_moe"), "model.layers", (*_ATTN, *_MLP, *_SHARED, _QWEN_EXPERTS), None),
)
# never prunable, whatever the family: embeddings, lm_head, norms, biases, routers
NEVER_PRUNED = ("embeddings", "lm_head", "norms", "biases", "MoE routers and shared-expert gates")


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


# --------------------------------------------------------------------------------------------------
# Prunable matrices
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Matrix:
    """One prunable matrix (out, in): a whole nn.Linear weight, rows of a fused one, or one expert's
    slice of a 3-D expert parameter (and rows of it: gate or up).

    name: its logical name, the key of its saliency, mask and report entry and what --ignore/--targets
    match: the parameter name, with [part] for a fused part and [expert] for an expert slice, e.g.
    model.layers.0.self_attn.qkv_proj.weight[k], model.layers.0.mlp.experts.gate_up_proj[3][up].
    param/expert/rows: where it lives in the model; stored/stored_expert/stored_rows: in the checkpoint.
    source: the input it reads, shared by the matrices that read the same activations (stats key)."""

    name: str
    block: int
    param: str
    expert: int | None
    rows: tuple[int, int] | None
    module: str
    source: str
    shape: tuple[int, int]
    stored: str = ""
    stored_expert: int | None = None
    stored_rows: tuple[int, int] | None = None

    @property
    def plain(self) -> bool:
        """A whole nn.Linear weight (what weight reconstruction supports)."""
        return self.expert is None and self.rows is None


def _spans(sizes) -> list[tuple[int, int]]:
    spans, lo = [], 0
    for size in sizes:
        spans.append((lo, lo + size))
        lo += size
    return spans


def block_matrices(model: nn.Module, index: int) -> list[Matrix]:
    """The prunable matrices of decoder block `index` of `model` (real or on the meta device), in the
    family's compute order."""
    family = family_for(model.config)
    block = decoder_blocks(model)[index]
    prefix = f"{family.blocks}.{index}."
    found: list[Matrix] = []
    for entry in family.entries:
        path = entry if isinstance(entry, str) else entry.module
        try:
            module = block.get_submodule(path)
        except AttributeError:
            continue  # e.g. the dense MLP of a sparse MoE block
        if isinstance(entry, Experts):
            gate_up, down = module.gate_up_proj, module.down_proj
            half, full = gate_up.shape[1] // 2, prefix + path
            for e in range(gate_up.shape[0]):
                for part, rows in (("gate", (0, half)), ("up", (half, 2 * half))):
                    found.append(Matrix(f"{full}.gate_up_proj[{e}][{part}]", index, f"{full}.gate_up_proj", e, rows,
                                        full, f"{full}[{e}].in", (half, gate_up.shape[2])))
                found.append(Matrix(f"{full}.down_proj[{e}]", index, f"{full}.down_proj", e, None, full,
                                    f"{full}[{e}].mid", tuple(down.shape[1:])))
            continue
        if not isinstance(module, nn.Linear):
            raise UsageError(f"{prefix}{path} is not an nn.Linear")
        weight = f"{prefix}{path}.weight"
        if isinstance(entry, Fused):
            spans = _spans(entry.sizes(model.config))
            if spans[-1][1] != module.out_features:
                raise UsageError(f"{weight}: {module.out_features} rows do not split into {entry.parts}")
            for part, rows in zip(entry.parts, spans, strict=True):
                found.append(Matrix(f"{weight}[{part}]", index, weight, None, rows, prefix + path, prefix + path,
                                    (rows[1] - rows[0], module.in_features)))
        else:
            found.append(Matrix(weight, index, weight, None, None, prefix + path, prefix + path,
                                (module.out_features, module.in_features)))
    return found


def meta_model(config) -> nn.Module:
    """The causal LM of `config` on the meta device (no memory): the shapes of every parameter."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except Exception as exc:  # noqa: BLE001 - a config transformers cannot build is the user's file
            raise UsageError(f"`model_dir`: config.json does not describe a model transformers can build: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


# building a 70B meta model takes seconds: once per config ({config: (matrices, {parameter: shape})})
_META_FACTS: dict[str, tuple[list[Matrix], dict[str, tuple[int, ...]]]] = {}


def _meta_facts(config) -> tuple[list[Matrix], dict[str, tuple[int, ...]]]:
    key = config.to_json_string()
    if key not in _META_FACTS:
        _META_FACTS.clear()
        model = meta_model(config)
        _META_FACTS[key] = (model_matrices(model), {n: tuple(p.shape) for n, p in model.named_parameters()})
    return _META_FACTS[key]


def model_matrices(model_or_config) -> list[Matrix]:
    """Every prunable matrix of a model (or of a config, through its meta-device model), block by block."""
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
        return [m for i in range(len(decoder_blocks(model))) for m in block_matrices(model, i)]
    return list(_meta_facts(model_or_config)[0])


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of the model of `config` (tied parameters once, under their first name)."""
    return dict(_meta_facts(config)[1])


def prunable_names(config) -> list[str]:
    """Logical names of the prunable matrices, block by block, in the family's order."""
    return [m.name for m in model_matrices(config)]


def resolve_stored(matrices: list[Matrix], config, keys) -> list[Matrix]:
    """Where each matrix is in a checkpoint whose tensor names are `keys`: its own parameter, or (MoE
    experts) the per-expert tensor of the family's stored layout. A one-line error if neither exists."""
    family = family_for(config)
    experts = {e.module: e for e in family.entries if isinstance(e, Experts)}
    resolved = []
    for m in matrices:
        if m.param in keys:
            resolved.append(replace(m, stored=m.param, stored_expert=m.expert, stored_rows=m.rows))
            continue
        entry = experts.get(m.module.removeprefix(f"{family.blocks}.{m.block}."))
        if entry is not None:
            part = m.name.rsplit("[", 1)[1].rstrip("]") if m.rows is not None else "down"
            stored = f"{family.blocks}.{m.block}." + entry.stored[part].format(e=m.expert)
            if stored in keys:
                resolved.append(replace(m, stored=stored, stored_expert=None, stored_rows=None))
                continue
        raise UsageError(f"`model_dir`: the checkpoint lacks the prunable tensor {m.param!r}")
    return resolved


def stored_name(config, param: str, keys) -> str | None:
    """The checkpoint name of a non-prunable block tensor (its own, or the family's rename), or None."""
    if param in keys:
        return param
    for model_side, stored in family_for(config).renames:
        if param.endswith("." + model_side):
            renamed = param[: -len(model_side)] + stored
            if renamed in keys:
                return renamed
    return None


def piece(tensor: torch.Tensor, expert: int | None, rows: tuple[int, int] | None) -> torch.Tensor:
    """The view of a matrix inside its (model or stored) tensor."""
    if expert is not None:
        tensor = tensor[expert]
    return tensor if rows is None else tensor[rows[0]:rows[1]]


def copy_stored(param: torch.Tensor, matrix: Matrix, stored: torch.Tensor) -> None:
    """Copy a matrix from its checkpoint tensor `stored` into its place in the model parameter `param`."""
    with torch.no_grad():
        piece(param, matrix.expert, matrix.rows).copy_(piece(stored, matrix.stored_expert, matrix.stored_rows))


def weight_of(model: nn.Module, matrix: Matrix) -> torch.Tensor:
    """The live view of a matrix in the model's parameter (writes go to the model)."""
    return piece(model.get_parameter(matrix.param), matrix.expert, matrix.rows)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    blocks = model.get_submodule(family_for(model.config).blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise UsageError(f"model has no decoder block list at {family_for(model.config).blocks!r}")
    return blocks


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
