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
import re
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import check_flag
from ..data import model_context
from ..errors import UsageError
from ..files import check_plain_files, is_regular, read_regular
from ..lazy import LazyMapping
from ..models import (
    copy_stored,
    decoder_blocks,
    family_for,
    model_matrices,
    parameter_shapes,
    piece,
    resolve_stored,
    stored_name,
)
from .identity import content_digest

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DENSE_DTYPES = ("F32", "F16", "BF16")
# config.json and an index are a few kB to a few MB (a 405B model's index: 1.5 MB): far beyond is not one
MAX_JSON_BYTES = 64 << 20
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")  # config keys of MoE expert counts


def load_config(model_dir: str, trust_remote_code: bool = False):
    """The transformers config of a model directory, with a one-line error for anything else: not a
    model directory, custom code without trust_remote_code, a quantized or FP8 checkpoint, an
    architecture without a family table."""
    from transformers import AutoConfig

    check_flag("trust_remote_code", trust_remote_code)  # "no" is truthy: it must not run a checkpoint's code
    if not os.path.isdir(model_dir):
        raise UsageError(f"`model_dir`: {model_dir!r} is not a directory")
    path = os.path.join(model_dir, "config.json")
    try:  # a directory we may not enter says so, rather than "no config.json"
        os.lstat(path)
    except FileNotFoundError:
        raise UsageError(f"`model_dir`: {model_dir!r} has no config.json (not a Hugging Face model "
                         "directory)") from None
    except OSError as exc:
        raise UsageError(f"`model_dir`: cannot read {model_dir}: {exc.strerror}") from None
    check_plain_files(model_dir, "model_dir")
    try:
        raw = json.loads(read_regular(path, "model_dir", MAX_JSON_BYTES))
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"`model_dir`: {path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"`model_dir`: {model_dir}/config.json is not a JSON object")
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

    if os.path.isdir(directory):
        check_plain_files(directory, "tokenizer_dir")
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 - missing or unreadable tokenizer files
        raise UsageError(f"no usable tokenizer in {directory!r} (pass `tokenizer_dir`): "
                         f"{str(exc).splitlines()[0][:200]}") from exc


def _index_shards(model_dir: str) -> list[str]:
    """The shard files named by a checkpoint's index, each present, or a one-line error."""
    index = os.path.join(model_dir, SAFE_INDEX)
    try:
        weight_map = json.loads(read_regular(index, "model_dir", MAX_JSON_BYTES))["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not all(isinstance(s, str) and s and os.sep not in s for s in shards):
            raise TypeError("shard names must be file names")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise UsageError(f"`model_dir`: {index} is not a valid safetensors index ({type(exc).__name__}: {exc}); "
                         "re-save the model with save_pretrained") from None
    for shard in shards:
        path = os.path.join(model_dir, shard)
        if os.path.exists(path) and not is_regular(path):
            raise UsageError(f"`model_dir`: {path} is not a regular file (a FIFO, device or directory): copy the "
                             "shard again")
        if not os.path.isfile(path):
            raise UsageError(f"`model_dir`: {path} is listed in {SAFE_INDEX} but missing: copy or download it again")
    return shards


def weight_shards(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint (sharded or single), or a one-line error."""
    if os.path.isfile(os.path.join(model_dir, SAFE_INDEX)):
        return _index_shards(model_dir)
    if os.path.isfile(os.path.join(model_dir, SAFE_SINGLE)):
        return [SAFE_SINGLE]
    raise UsageError(f"`model_dir`: {model_dir!r} has no safetensors weights (re-save it with save_pretrained to "
                     "convert)")


def unreadable(path: str, exc: Exception) -> UsageError:
    """The one-line error of a weight file that cannot be read as safetensors (truncated, garbled...)."""
    if isinstance(exc, OSError):
        return UsageError(f"`model_dir`: cannot read {path}: {exc.strerror or exc}")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UsageError(f"`model_dir`: {path} is not a readable safetensors file ({detail}); it is truncated or "
                      "corrupt: copy or download it again")


def shard_headers(model_dir: str) -> dict[str, tuple[str, str, list[int]]]:
    """{tensor name: (shard file, safetensors dtype, shape)} of every tensor of a checkpoint, from the
    shard headers (no tensor data is read; safetensors checks that the header covers the file)."""
    headers = {}
    for shard in weight_shards(model_dir):
        path = os.path.join(model_dir, shard)
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # the OS's reason (safetensors' may be another)
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    info = handle.get_slice(key)
                    headers[key] = (shard, info.get_dtype(), list(info.get_shape()))
        except (SafetensorError, OSError) as exc:
            raise unreadable(path, exc) from None
    _check_index(model_dir, headers)
    return headers


def _check_index(model_dir: str, headers: dict[str, tuple[str, str, list[int]]]) -> None:
    """An index must say where each tensor really is (transformers' loader trusts it)."""
    if not os.path.isfile(os.path.join(model_dir, SAFE_INDEX)):
        return
    index = read_regular(os.path.join(model_dir, SAFE_INDEX), "model_dir", MAX_JSON_BYTES)
    for name, shard in json.loads(index)["weight_map"].items():
        if headers.get(name, (None,))[0] != shard:
            raise UsageError(f"`model_dir`: {SAFE_INDEX} places {name!r} in {shard}, which does not hold it: "
                             "re-save the model with save_pretrained")


def _expert_count(headers: Mapping[str, list[int]]) -> int:
    """Experts the weights hold: stored one by one (`experts.E.`), or as 3-D tensors (E first)."""
    count = 0
    for name, shape in headers.items():
        if (match := re.search(r"\.experts\.(\d+)\.", name)) is not None:
            count = max(count, int(match.group(1)) + 1)
        elif ".experts." in name and len(shape) == 3:
            count = max(count, shape[0])
    return count


def check_counts(config, headers: Mapping[str, list[int]]) -> None:
    """config.json's block and expert counts against the tensors the weights hold ({name: shape}), before
    anything is built from it: a skeleton of a count far beyond the weights (another model's config, or a
    hostile one) would take minutes and gigabytes before any shape could be compared."""
    layers = getattr(config, "num_hidden_layers", None)
    if not (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1):
        raise UsageError(f"`model_dir`: config.json's num_hidden_layers is {layers!r}, expected a positive integer")
    prefix = re.compile(re.escape(family_for(config).blocks) + r"\.(\d+)\.")
    blocks = {int(match.group(1)) for name in headers if (match := prefix.match(name)) is not None}
    if layers > len(blocks):
        raise UsageError(f"`model_dir`: config.json says num_hidden_layers {layers}, but the weights hold "
                         f"{len(blocks)} decoder blocks: the config does not describe these weights")
    for key in EXPERT_COUNTS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > (held := _expert_count(headers)):
            raise UsageError(f"`model_dir`: config.json says {key} {value}, but the weights hold {held} experts: the "
                             "config does not describe these weights")


def check_finite(name: str, tensor: torch.Tensor, option: str = "model_dir") -> None:
    """Refuse a weight with NaN or Inf entries (pruning would keep them, and its saliency would be 0)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise UsageError(f"`{option}`: {name} has {bad} non-finite values (NaN or Inf): the weights are corrupt; "
                         "repair or re-download them (unipruning does not prune them)")


def check_seqlen(config, seqlen: int | None, option: str = "seqlen") -> None:
    """Refuse windows longer than the model's context (positions beyond it were never trained; the
    default `seqlen` is the context itself, at most data.SEQLEN_CAP)."""
    context = model_context(config.to_dict())
    if seqlen is not None and context is not None and seqlen > context[1]:
        key, limit = context
        raise UsageError(f"`{option}` {seqlen} is longer than the model's context ({key} {limit} in config.json): "
                         f"pass `{option}` {limit} or less")


def check_token_ids(config, windows: torch.Tensor, tokenizer_dir: str) -> None:
    """Refuse token ids the model's embedding does not have (a tokenizer of another model)."""
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    top = int(windows.max()) if windows.numel() else -1
    if vocab and top >= vocab:
        raise UsageError(f"`tokenizer_dir`: the tokenizer in {tokenizer_dir} produces token id {top}, but the model's "
                         f"embedding has {vocab} rows (vocab_size): use the model's own tokenizer")


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
        self.shards = sorted({shard for shard, _, _ in headers.values()})
        self.shard_of = {name: shard for name, (shard, _, _) in headers.items()}
        self.header = {name: (dtype, shape) for name, (_, dtype, shape) in headers.items()}
        check_counts(config, {name: shape for name, (_, shape) in self.header.items()})
        self.matrices = resolve_stored(model_matrices(config), config, self.shard_of)
        self.matrix = {m.name: m for m in self.matrices}
        if not self.matrices:
            raise UsageError(f"`model_dir`: {model_dir}/config.json describes a model without prunable matrices")
        self._check_dtypes()
        self._check_shapes()
        self._digest: str | None = None

    def _check_dtypes(self) -> None:
        """Every tensor the model is built from is stored dense (F32, F16 or BF16), not only the first: an
        integer or FP8 matrix further on would be pruned as a number of another kind, or fail mid-run."""
        names = [m.stored for m in self.matrices]
        names += [n for p in parameter_shapes(self.config) if (n := stored_name(self.config, p, self.shard_of))]
        for name in dict.fromkeys(names):
            if (dtype := self.header[name][0]) not in DENSE_DTYPES:
                raise UsageError(f"`model_dir`: {name} is stored as {dtype}; unipruning needs dense fp16/bf16/fp32 "
                                 "weights (FP8 and integer-quantized checkpoints are refused)")

    def _check_shapes(self) -> None:
        """Every parameter of the config's model is stored with its shape (a config.json that disagrees
        with the weights, e.g. another hidden_size or vocab_size, is refused before anything is read)."""
        assembled = {m.param for m in self.matrices if m.stored != m.param}
        for name, shape in parameter_shapes(self.config).items():
            stored = stored_name(self.config, name, self.shard_of)
            if stored is None and name not in assembled:
                raise UsageError(f"`model_dir`: the checkpoint lacks {name!r} (config.json and the weights disagree)")
            if stored is not None and tuple(self.header[stored][1]) != shape:
                self._disagree(stored, shape)
        for m in self.matrices:
            stored = torch.empty(self.header[m.stored][1], device="meta")
            if tuple(piece(stored, m.stored_expert, m.stored_rows).shape) != m.shape:
                self._disagree(m.stored, m.shape)

    def _disagree(self, stored: str, shape) -> None:
        raise UsageError(f"`model_dir`: {stored} is {tuple(self.header[stored][1])} in "
                         f"{os.path.join(self.model_dir, self.shard_of[stored])}, but config.json implies "
                         f"{tuple(shape)}: the config does not describe these weights")

    def content_sha256(self) -> str:
        """The identity of the weights (io/identity.py): computed once per file, then cached."""
        if self._digest is None:
            self._digest = content_digest([os.path.join(self.model_dir, shard) for shard in self.shards])
        return self._digest

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
            path = os.path.join(self.model_dir, shard)
            try:
                with safe_open(path, framework="pt") as handle:
                    for key in keys:
                        out[key] = handle.get_tensor(key)
            except (SafetensorError, OSError) as exc:  # changed since its header was read
                raise unreadable(path, exc) from None
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
            check_finite(name, tensor)
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
            for name, param in block.named_parameters():  # on the device, as the block arrives: no extra read
                if not bool(torch.isfinite(param).all()):
                    sources = [whole[name]] if name in whole else [m.stored for m in pieces[name]]
                    for stored in sources:
                        check_finite(stored, tensors[stored])
                    raise UsageError(f"`dtype`: {sources[0]} overflows in {dtype} (values beyond its range): pass "
                                     "`dtype` float32")
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
