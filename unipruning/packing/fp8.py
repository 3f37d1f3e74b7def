"""FP8 + 2:4 checkpoints for torchao's sparse FP8 kernel: written on any machine, run on a Hopper GPU.

torchao 0.18 keeps one FP8 + 2:4 route (`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
packing_format=Float8PackingFormat.SPARSE_2D_DATA_2D_METADATA)`, i.e. `Float8Sparse2x4_2DData2DMetadataTensor`):
e4m3 weights with one float32 scale per output row, e4m3 activations quantized per token at run time, and
the CUTLASS matmul `torchao::rowwise_scaled_linear_sparse_cutlass_f8f8`, built for compute capability 9.x
only. Its packed layout comes only from the CUDA op `torchao::to_sparse_semi_structured_cutlass_sm9x_f8`,
and torchao cannot serialize the tensor (its safetensors support and transformers' save_pretrained refuse
the type), so this module stores a portable format of its own and builds torchao's tensor when loading.

`unipruning pack --format fp8-2:4` writes, for every 2:4 prunable matrix `X.weight` (m, k):
- `X.weight_fp8_values` (m, k/2) float8_e4m3fn: the two kept entries of each group of 4, in index order;
- `X.weight_fp8_meta` (m, k/8) uint8: per group the nibble i0 | i1 << 2 (i0 < i1, the kept positions),
  group 2j in the low nibble of byte j and group 2j+1 in the high one (row-major, device-independent);
- `X.weight_fp8_scale` (m, 1) float32: amax(|row|) / 448 computed as torchao computes it, except that an
  all-zero row gets 1.0 (torchao divides 0 by 0 there and stores NaN codes, which its compressor would
  count as non-zeros).
Values and metadata are 5/16 of the bf16 bytes. Every other tensor is copied in `dtype` (the kernel's
output dtype, bfloat16 or float16); config.json gains `unipruning_fp8_24` {format_version, dtype, packed,
dense: {name: why}}. Which entries are kept is never decided here, nor by torchao (its compressor assumes
2:4 and does not check): a matrix that is not 2:4 stays dense, with the reason.

`load_fp8_24` (and `load_packed` on such a directory) unpacks one matrix at a time to a dense e4m3 matrix on
the GPU, lets torchao compress it and swaps it into its nn.Linear. Two limits of torchao 0.18 are worked
around: inputs are flattened to 2-D (its sparse linear passes a (batch, seq, 1) activation scale to a kernel
that wants it 1-D), and all-zero rows get scale 1 (above). mode="reference" loads the dequantized weights
as dense tensors on any device: the weights the kernel multiplies by, to check a checkpoint without a GPU.
No speed is claimed for this path here: it has not run on a GPU yet (benchmarks/bench_fp8_24.py measures it).
"""

from __future__ import annotations

import os
import time
import types

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import check_flag
from ..errors import UsageError
from ..io.checkpoint import load_config, weight_shards
from ..io.staging import preflight, write_json, writing
from ..io.writer import copy_side_files
from ..progress import Progress, bar_of
from .assemble import add_config_entry, existing_sparsity_config, fill_model, packable, write_index

FORMAT_VERSION = 1
CONFIG_KEY = "unipruning_fp8_24"
VALUES, META, SCALE = "_fp8_values", "_fp8_meta", "_fp8_scale"
REPORT = "fp8_24_report.json"
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
# the kernel's shape limits: k/2 columns of values % 16 (rowwise_scaled_linear_sparse_cutlass's input checks),
# rows % 8 (the CUTLASS tile, as the prototype read it; not yet confirmed on a GPU)
ROW_MULTIPLE, COL_MULTIPLE = 8, 32
SOURCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COMPUTE_DTYPES = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16}
TORCHAO_COMPRESS = "torchao::to_sparse_semi_structured_cutlass_sm9x_f8"
MODES = ("sparse", "reference")


# ------------------------------------------------------------------------------------------ checks
def skip_reason(weight: torch.Tensor) -> str | None:
    """Why `weight` cannot become an FP8 + 2:4 matrix, or None when it can."""
    if weight.dim() != 2:
        return f"expected a 2-D weight, got shape {tuple(weight.shape)}"
    if weight.dtype not in SOURCE_DTYPES:
        return f"expected float16, bfloat16 or float32, got {weight.dtype}"
    rows, cols = weight.shape
    if rows % ROW_MULTIPLE or cols % COL_MULTIPLE:
        return (f"shape {tuple(weight.shape)} needs rows % {ROW_MULTIPLE} == 0 and cols % {COL_MULTIPLE} == 0 "
                "(torchao's sparse FP8 kernel)")
    if not bool(torch.isfinite(weight).all()):
        return "holds NaN or infinity"
    if not bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all()):
        return "not 2:4 sparse (a group of 4 holds more than 2 non-zeros)"
    return None


# -------------------------------------------------------------------------------- the stored format
def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, float32 scale (rows, 1)) of a 2-D tensor, one scale per row: torchao's per-row recipe
    (amax / 448 in the tensor's own dtype, then float32; codes of x / scale clamped to +-448), except scale
    1 for an all-zero row."""
    amax = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _kept_slots(bits: torch.Tensor) -> torch.Tensor:
    """(m, k/4, 4) bool, two per group: the non-zeros (the sign bit ignored: -0.0 is a zero), filled up at
    position 2, then 3, in a group with fewer (as PyTorch's 2:4 converter fills)."""
    keep = (bits & 0x7F) != 0
    for slot in (2, 3):
        keep[..., slot] |= (keep.sum(-1) < 2) & ~keep[..., slot]
    return keep


def pack_fp8_24(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 e4m3 codes (m, k) -> (values (m, k/2) e4m3, metadata (m, k/8) uint8); `q` must be 2:4."""
    rows, cols = q.shape
    bits = q.contiguous().view(torch.uint8).reshape(rows, cols // 4, 4)
    keep = _kept_slots(bits)
    slot = torch.arange(4, device=q.device)
    first = torch.where(keep, slot, 4).amin(-1)
    second = torch.where(keep, slot, -1).amax(-1)
    values = torch.stack((bits.gather(-1, first[..., None]), bits.gather(-1, second[..., None])), -1)
    nibbles = (first | (second << 2)).to(torch.uint8).reshape(rows, cols // 8, 2)
    return values.reshape(rows, cols // 2).view(FP8), nibbles[..., 0] | (nibbles[..., 1] << 4)


def unpack_fp8_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense (m, k) e4m3 codes of a stored pair, +0.0 at the dropped entries."""
    rows, half = values.shape
    nibbles = torch.stack((meta & 0xF, meta >> 4), -1).reshape(rows, half // 2)
    slots = torch.stack((nibbles & 3, nibbles >> 2), -1).long()
    dense = torch.zeros(rows, half // 2, 4, dtype=torch.uint8, device=values.device)
    dense.scatter_(-1, slots, values.view(torch.uint8).reshape(rows, half // 2, 2))
    return dense.reshape(rows, 2 * half).view(FP8)


def dequantize(values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight the kernel multiplies by, dense, in `dtype`."""
    return (unpack_fp8_24(values, meta).float() * scale).to(dtype)


def emulate_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the sparse FP8 kernel computes, in float32 on any device: per-token e4m3 activations (the same
    per-row recipe), the e4m3 weight, both scales, the bias, then the input's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    xq, xscale = quantize_rowwise(flat)
    out = (xq.float() @ unpack_fp8_24(values, meta).float().t()) * xscale * scale.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], -1)


# ------------------------------------------------------------------------------------------- export
def _convert(tensors: dict[str, torch.Tensor], prunable: set[str], dtype: torch.dtype, report: dict) -> dict:
    """The tensors of one shard as stored: 2:4 prunable matrices as values, metadata and scales."""
    written = {}
    for name, tensor in tensors.items():
        reason = skip_reason(tensor) if name in prunable else "not prunable"
        if reason is not None:
            written[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            if name in prunable:
                report["dense"][name] = reason
            continue
        q, scale = quantize_rowwise(tensor)
        values, meta = pack_fp8_24(q)
        written[name + VALUES], written[name + META], written[name + SCALE] = values, meta, scale
        report["packed"].append(name)
        report["bytes_bf16"] += tensor.numel() * 2
        report["bytes_stored"] += values.numel() + meta.numel() + scale.numel() * 4
    return written


def export_fp8_24(model_dir: str, out: str, dtype: str = "auto", overwrite: bool = False,
                  progress: Progress | None = None) -> dict:
    """`unipruning pack --format fp8-2:4`: write the FP8 + 2:4 checkpoint of a 2:4-pruned model directory
    to `out` (needs no torchao and no GPU); returns the report (also written as fp8_24_report.json)."""
    start = time.perf_counter()
    if dtype not in COMPUTE_DTYPES:
        raise UsageError(f"`dtype`: the FP8 kernel outputs bfloat16 or float16, got {dtype!r}")
    check_flag("overwrite", overwrite)
    _, prunable = packable(model_dir)
    preflight(out, overwrite, {"model_dir": model_dir})
    report = {"command": "pack", "format": "fp8-2:4", "model": os.path.abspath(model_dir), "packed": [], "dense": {},
              "bytes_bf16": 0, "bytes_stored": 0}
    shards, index = weight_shards(model_dir), {}
    with writing(out, overwrite, {"model_dir": model_dir}) as staging, \
            bar_of(progress, len(shards), "pack fp8", "shard") as bar:
        for shard in shards:
            with safe_open(os.path.join(model_dir, shard), framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            written = _convert(tensors, prunable, COMPUTE_DTYPES[dtype], report)
            save_file(written, os.path.join(staging, shard), metadata={"format": "pt"})
            index.update(dict.fromkeys(written, shard))
            bar.update(1)
        if not report["packed"]:
            first = next(iter(report["dense"].items()), ("", "no prunable matrices"))
            raise UsageError(f"`model_dir`: no 2:4 matrix to pack as FP8 (e.g. {first[0]}: {first[1]})")
        _finish_export(model_dir, staging, index, report, COMPUTE_DTYPES[dtype], start)
    return report


def _finish_export(model_dir: str, staging: str, index: dict, report: dict, dtype: torch.dtype, start: float):
    write_index(model_dir, staging, index)
    copy_side_files(model_dir, staging, existing_sparsity_config(model_dir))
    name = str(dtype).removeprefix("torch.")
    entry = {"format_version": FORMAT_VERSION, "float8_dtype": "float8_e4m3fn", "weight_scale": "per-row float32",
             "activation": "dynamic per-token float8_e4m3fn", "dtype": name, "packed": sorted(report["packed"]),
             "dense": dict(sorted(report["dense"].items()))}
    add_config_entry(os.path.join(staging, "config.json"), entry, dtype, CONFIG_KEY)
    report.update(dtype=name, packed_matrices=len(report["packed"]), dense_matrices=report.pop("dense"),
                  stored_fraction_of_bf16=report["bytes_stored"] / report["bytes_bf16"],
                  wall_seconds=time.perf_counter() - start)
    report["packed"] = sorted(report["packed"])
    write_json(os.path.join(staging, REPORT), report)


# --------------------------------------------------------------------------------------------- load
def sparse_support(device: torch.device) -> str | None:
    """Why torchao's FP8 + 2:4 kernels cannot run on `device`, or None when they can."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"torchao's FP8 + 2:4 kernel needs a CUDA GPU of compute capability 9.x (H100/H200), not {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:  # both CUTLASS ops are built for sm90a only: not Ampere/Ada, not Blackwell
        return f"{device} has compute capability {major}.{minor}; torchao's FP8 + 2:4 kernel needs 9.x"
    try:
        import torchao.ops  # noqa: F401 - defines the ops; torchao's .so registers their CUDA kernels
    except ImportError as exc:
        return f"torchao is not installed ({exc}): pip install 'unipruning[fp8]'"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(TORCHAO_COMPRESS, "CUDA"):
        return ("torchao's CUDA extension did not load (its 0.18 wheels need torch >= 2.11 built for CUDA 13; see "
                "the warning torchao printed at import)")
    return None


def fp8_24_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torchao's FP8 + 2:4 tensor of dense 2:4 e4m3 codes on a Hopper GPU (torchao's from_hp after its
    quantization, which the export has done)."""
    from torchao.ops import to_sparse_semi_structured_cutlass_sm9x_f8
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows import (
        Float8Sparse2x4_2DData2DMetadataTensor,
        QuantizeTensorToFloat8Kwargs,
    )

    qdata, sparse_meta = to_sparse_semi_structured_cutlass_sm9x_f8(q.contiguous())
    return Float8Sparse2x4_2DData2DMetadataTensor(
        qdata, sparse_meta, scale.to(q.device, torch.float32).contiguous(), block_size=[1, q.shape[1]],
        act_quant_kwargs=QuantizeTensorToFloat8Kwargs(FP8, PerRow()), dtype=dtype)


def _flat_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # torchao's sparse linear squeezes a (b, s, 1) activation scale to (b, s), which the kernel refuses for
    # s > 1: give it 2-D inputs
    out = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def swap_linear_(module: nn.Linear, weight: torch.Tensor) -> None:
    """Make `weight` (torchao's tensor) the weight of `module`, with the 2-D forward above."""
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.forward = types.MethodType(_flat_forward, module)


def _entry(model_dir: str):
    config = load_config(model_dir)
    entry = getattr(config, CONFIG_KEY, None)
    if not isinstance(entry, dict) or entry.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"`model_dir`: {model_dir} is not an FP8 + 2:4 checkpoint of format version "
                         f"{FORMAT_VERSION} (write one with `unipruning pack --format fp8-2:4`)")
    return config, entry


def load_fp8_24(model_dir: str, device: str | torch.device = "cuda", mode: str = "sparse") -> nn.Module:
    """The causal LM of an FP8 + 2:4 checkpoint on `device`. mode "sparse": every stored matrix becomes
    torchao's FP8 + 2:4 tensor, one at a time (a 9.x GPU and the `fp8` extra; otherwise a one-line
    UsageError); mode "reference": the dequantized weights as dense tensors, on any device."""
    if mode not in MODES:
        raise UsageError(f"`mode`: expected one of {', '.join(MODES)}, got {mode!r}")
    device = torch.device(device)
    config, entry = _entry(model_dir)
    if mode == "sparse" and (why := sparse_support(device)) is not None:
        raise UsageError(f"load_fp8_24: {why}; mode='reference' loads the dequantized weights anywhere")
    dtype = getattr(torch, entry["dtype"])

    def weight(handle, name: str) -> torch.Tensor:
        values, meta, scale = (handle.get_tensor(name + s).to(device) for s in (VALUES, META, SCALE))
        if mode == "reference":
            return dequantize(values, meta, scale, dtype)
        return fp8_24_weight(unpack_fp8_24(values, meta), scale, dtype)

    model = fill_model(model_dir, config, dtype, set(entry["packed"]), VALUES, device, weight)
    if mode == "sparse":
        for name in entry["packed"]:
            module = model.get_submodule(name.removesuffix(".weight"))
            module.forward = types.MethodType(_flat_forward, module)
    return model.eval()


def sparsify_fp8_24_(model: nn.Module) -> dict[str, str | None]:
    """In-memory twin of export + load for a 2:4 model already on a Hopper GPU (the benchmark): swaps every
    2:4 nn.Linear for torchao's FP8 + 2:4 weight. Returns {module: None if swapped, else why not}."""
    outcome: dict[str, str | None] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        reason = skip_reason(module.weight.detach()) or sparse_support(module.weight.device)
        if reason is None:
            q, scale = quantize_rowwise(module.weight.detach())
            swap_linear_(module, fp8_24_weight(q, scale, module.weight.dtype))
        outcome[name] = reason
    return outcome
