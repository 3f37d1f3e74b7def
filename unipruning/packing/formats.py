"""2:4 weights packed for sparse tensor cores, and `sparsify_`, which swaps them into nn.Linear layers.

Two layouts, both held by PyTorch's semi-structured tensors (`torch.sparse`), so `F.linear` runs them:

- "cutlass" (`SparseSemiStructuredTensorCUTLASS`), fp16/bf16, weight (m, k), m % 32 == 0, k % 64 == 0:
  * values (m, k/2): for every group of 4 consecutive entries of a row, its two kept entries in index
    order;
  * metadata (m, k/16) int16: per group the nibble i0 | i1 << 2 (i0 < i1 the kept positions), the
    nibbles of 4 consecutive groups in one int16 (group j at bits 4j), and then the int16 elements
    permuted into the order CUTLASS's sparse GEMM reads them: rows permuted within each 32-row band,
    2x2 blocks transposed, column-major interleaved by 2 (see `_interleave`).
  Built here in pure torch on any device (bit-exact with PyTorch's own converter), or by the fused CUDA
  kernel of `unipruning._C` on a GPU when the extension is built; both give the same bits.
- "cusparselt" (`SparseSemiStructuredTensorCUSPARSELT`): one buffer of values and metadata whose layout
  is cuSPARSELt's own (undocumented, version-dependent), so it is produced only by the library's compress
  routine: through `unipruning._C` when built with cuSPARSELt, else through `torch._cslt_compress`. CUDA
  only.

Which entries are kept comes from the caller, never from a second selection rule: either the weight is
already 2:4 (at most two non-zeros per group: a checkpoint pruned with `--pattern 2:4`), or a keep mask
with exactly two of every four (`MaskSpec(pattern="2:4")`, the engine's N:M op) is passed beside it. A
group with fewer than two non-zeros keeps zero entries at positions 2, then 3 to fill its two slots
(PyTorch's converter does the same, so the metadata bits agree).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from ..errors import UsageError

log = logging.getLogger("unipruning")

LAYOUTS = ("cutlass", "cusparselt")
PACKABLE_DTYPES = (torch.float16, torch.bfloat16)
ROW_MULTIPLE, COL_MULTIPLE = 32, 64  # CUTLASS fp16/bf16 sparse GEMM limits (PyTorch's shape constraints)


# ------------------------------------------------------------------------------------- checks
def check_packable(weight: torch.Tensor, mask: torch.Tensor | None = None, name: str = "weight") -> None:
    """Raise UsageError (one line) unless `weight` (with `mask`, if given) can be packed as 2:4."""
    if not isinstance(weight, torch.Tensor) or (mask is not None and not isinstance(mask, torch.Tensor)):
        raise UsageError(f"{name}: expected a tensor (and a bool tensor as mask), got {type(weight).__name__}")
    if weight.dim() != 2:
        raise UsageError(f"{name}: expected a 2-D weight, got {weight.dim()}-D shape {tuple(weight.shape)}")
    if weight.dtype not in PACKABLE_DTYPES:
        hint = " (PyTorch's float32 semi-structured format is 1:2, not 2:4)" if weight.dtype == torch.float32 else ""
        raise UsageError(f"{name}: expected float16 or bfloat16, got {weight.dtype}{hint}; cast it first")
    rows, cols = weight.shape
    if rows % ROW_MULTIPLE or cols % COL_MULTIPLE:
        raise UsageError(
            f"{name}: shape {tuple(weight.shape)} must have rows % {ROW_MULTIPLE} == 0 and "
            f"cols % {COL_MULTIPLE} == 0 for 2:4 sparse tensor cores"
        )
    if mask is not None:
        if mask.shape != weight.shape or mask.dtype != torch.bool:
            raise UsageError(f"{name}: mask must be a bool tensor of shape {tuple(weight.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        counts = mask.reshape(rows, cols // 4, 4).sum(-1)
        if not bool((counts == 2).all()):
            raise UsageError(f"{name}: mask must keep exactly 2 of every 4 consecutive entries of a row "
                             "(an N:M mask from MaskSpec(pattern='2:4'))")
    else:
        counts = (weight != 0).reshape(rows, cols // 4, 4).sum(-1)
        if not bool((counts <= 2).all()):
            raise UsageError(f"{name}: not 2:4 sparse (a group of 4 holds more than 2 non-zeros); prune it with "
                             "--pattern 2:4 or pass its keep mask")


# -------------------------------------------------------------- CUTLASS layout: the torch twin
def _interleave(meta: torch.Tensor) -> torch.Tensor:
    """(m, k/16) int16 metadata, row-major -> CUTLASS's order, returned with the same shape.

    With row r = 32g + 16a1 + 8a0 + b and column c = 2h + e, element (r, c) goes to flat position
    2m*h + 64g + 8b + 4a1 + 2e + a0: rows are regrouped within each 32-row band, the 2x2 blocks are
    transposed (a0 and e trade places) and the result is stored column-major, interleaved by 2."""
    m, nc = meta.shape
    return meta.reshape(m // 32, 2, 2, 8, nc // 2, 2).permute(4, 0, 3, 1, 5, 2).reshape(m, nc)


def _deinterleave(meta: torch.Tensor) -> torch.Tensor:
    m, nc = meta.shape
    return meta.reshape(nc // 2, m // 32, 8, 2, 2, 2).permute(1, 3, 5, 2, 0, 4).reshape(m, nc)


def _kept_slots(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(m, k/4, 4) bool with exactly two True per group: the mask, or the non-zeros filled up with
    zero entries at position 2, then 3."""
    rows, cols = weight.shape
    if mask is not None:
        return mask.reshape(rows, cols // 4, 4)
    keep = (weight != 0).reshape(rows, cols // 4, 4).clone()
    fill2 = (keep.sum(-1) < 2) & ~keep[..., 2]
    keep[..., 2] |= fill2
    fill3 = (keep.sum(-1) < 2) & ~keep[..., 3]
    keep[..., 3] |= fill3
    return keep


def pack_cutlass_torch(weight: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (m, k/2), metadata (m, k/16) int16) in the CUTLASS layout; inputs assumed checked."""
    rows, cols = weight.shape
    keep = _kept_slots(weight, mask)
    slot = torch.arange(4, device=weight.device)
    first = torch.where(keep, slot, 4).amin(-1)  # i0: the lower kept position
    second = torch.where(keep, slot, -1).amax(-1)  # i1: the higher one
    groups = weight.reshape(rows, cols // 4, 4)
    values = torch.stack((groups.gather(-1, first[..., None]), groups.gather(-1, second[..., None])), -1)
    nibbles = (first | (second << 2)).to(torch.int32).reshape(rows, cols // 16, 4)
    packed = (nibbles << torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=weight.device)).sum(-1)
    meta = ((packed ^ 0x8000) - 0x8000).to(torch.int16)  # the 16 bits as a signed int16
    return values.reshape(rows, cols // 2), _interleave(meta)


def unpack_cutlass_torch(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense (m, k) weight of a CUTLASS-layout pair (zeros where nothing is kept)."""
    rows, half = values.shape
    bits = _deinterleave(meta).to(torch.int32) & 0xFFFF
    shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=meta.device)
    slots = ((bits[..., None] >> shifts) & 3).reshape(rows, half // 2, 2).long()
    dense = torch.zeros(rows, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, slots, values.reshape(rows, half // 2, 2))
    return dense.reshape(rows, 2 * half)


# ------------------------------------------------------------------------------ the extension
_EXTENSION: object | None = None
_EXTENSION_TRIED = False


def extension():
    """The compiled `unipruning._C` module, or None when it was not built (never an import error)."""
    global _EXTENSION, _EXTENSION_TRIED
    if not _EXTENSION_TRIED:
        _EXTENSION_TRIED = True
        try:
            from .. import _C  # noqa: F401 - registers torch.ops.unipruning.pack24_cutlass / cslt_compress

            _EXTENSION = _C
            _register_fakes()
        except ImportError as exc:
            log.debug("unipruning._C not available (%s); 2:4 packing uses the torch path", exc)
    return _EXTENSION


def _check_fake_weight(weight: torch.Tensor, op: str) -> None:
    """ops.cpp's check_weight, for fake tensors: the same refusals, in one line each."""
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D, got {weight.dim()}-D")
    torch._check(weight.dtype in (torch.float16, torch.bfloat16),
                 lambda: f"{op}: weight must be float16 or bfloat16, got {weight.dtype}")
    torch._check(weight.shape[0] % 32 == 0 and weight.shape[1] % 64 == 0,
                 lambda: f"{op}: weight shape {tuple(weight.shape)} must have rows % 32 == 0 and cols % 64 == 0")


def _register_fakes() -> None:
    """Shapes of the extension's outputs for tracing (torch.compile, meta tensors), with ops.cpp's checks."""

    @torch.library.register_fake("unipruning::pack24_cutlass")
    def _(weight, mask):
        _check_fake_weight(weight, "pack24_cutlass")
        if mask is not None:
            torch._check(mask.dtype == torch.bool, lambda: f"pack24_cutlass: mask must be bool, got {mask.dtype}")
            torch._check(mask.shape == weight.shape, lambda: f"pack24_cutlass: mask shape {tuple(mask.shape)} "
                                                             f"differs from the weight's {tuple(weight.shape)}")
        rows, cols = weight.shape
        return weight.new_empty(rows, cols // 2), weight.new_empty(rows, cols // 16, dtype=torch.int16)

    @torch.library.register_fake("unipruning::cslt_compress")
    def _(dense):
        _check_fake_weight(dense, "cslt_compress")
        return dense.new_empty(dense.numel() * 9 // 16)  # the size ops.cpp allocates, as torch does


def _has_op(name: str) -> bool:
    """Whether the extension runs `name` (cslt_compress only when built with cuSPARSELt)."""
    ext = extension()
    if ext is None or not hasattr(torch.ops.unipruning, name):
        return False
    return name != "cslt_compress" or bool(getattr(ext, "with_cusparselt", 0))


# -------------------------------------------------------------------------------- public API
def _semi_structured(cls, shape, **inner) -> torch.Tensor:
    with warnings.catch_warnings():  # PyTorch warns on every construction that the API is a prototype
        warnings.simplefilter("ignore", UserWarning)
        return cls(shape, **inner)


def cutlass_tensor(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """PyTorch's CUTLASS semi-structured tensor of a packed pair: values (m, k/2), metadata (m, k/16)."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    shape = torch.Size((values.shape[0], 2 * values.shape[1]))
    return _semi_structured(SparseSemiStructuredTensorCUTLASS, shape, packed=values, meta=meta, packed_t=None,
                            meta_t=None, compressed_swizzled_bitmask=None, requires_grad=False)


def pack_24(weight: torch.Tensor, layout: str = "cutlass", *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a 2:4 weight (or a dense weight and its 2:4 keep `mask`) for sparse tensor cores.

    Returns PyTorch's semi-structured tensor of `layout` ("cutlass" on any device, "cusparselt" on CUDA),
    usable as an nn.Linear weight; `unpack_24` is its inverse."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

    if layout not in LAYOUTS:
        raise UsageError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    check_packable(weight, mask)
    if mask is not None and mask.device != weight.device:
        raise UsageError(f"mask: on {mask.device}, expected the weight's device {weight.device}")
    weight = weight.detach().contiguous()
    if layout == "cutlass":
        if weight.is_cuda and _has_op("pack24_cutlass"):
            values, meta = torch.ops.unipruning.pack24_cutlass(weight, mask)
        else:
            values, meta = pack_cutlass_torch(weight, mask)
        return cutlass_tensor(values, meta)
    if not weight.is_cuda:
        raise UsageError("layout 'cusparselt' needs the weight on a CUDA device (cuSPARSELt compresses on the GPU)")
    dense = weight  # dropped entries become +0.0 (weight * mask would leave -0.0 for negative ones)
    if mask is not None:
        dense = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    if _has_op("cslt_compress"):
        compressed = torch.ops.unipruning.cslt_compress(dense)
    else:
        compressed = torch._cslt_compress(dense)
    return _semi_structured(
        SparseSemiStructuredTensorCUSPARSELT, weight.shape, packed=compressed, meta=None, packed_t=None,
        meta_t=None, compressed_swizzled_bitmask=None,
        fuse_transpose_cusparselt=SparseSemiStructuredTensorCUSPARSELT._FUSE_TRANSPOSE,
        alg_id_cusparselt=SparseSemiStructuredTensorCUSPARSELT._DEFAULT_ALG_ID, requires_grad=False,
    )


def unpack_24(packed: torch.Tensor) -> torch.Tensor:
    """The dense weight of a packed 2:4 tensor, with +0.0 at the dropped entries (for tests and export)."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    if isinstance(packed, SparseSemiStructuredTensorCUTLASS):
        return unpack_cutlass_torch(packed.packed, packed.meta)
    if isinstance(packed, torch.sparse.SparseSemiStructuredTensor):
        return packed.to_dense()  # cuSPARSELt: a product with the identity, the only way its layout is read
    raise UsageError(f"packed: expected a tensor made by pack_24, got {type(packed).__name__}")


def sparse_device_problem(device: torch.device) -> str | None:
    """Why `device` cannot run PyTorch's 2:4 sparse matmuls (a CUDA GPU of compute capability 8.0+), or None."""
    if device.type != "cuda":
        return f"2:4 sparse matmuls run only on a CUDA GPU (compute capability 8.0+), not on {device}"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return f"device {device}: torch {torch.__version__} ({build}) sees no CUDA GPU here"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"{device} lacks sparse tensor cores (compute capability 8.0+ needed)"
    return None


def skip_reason(weight: torch.Tensor) -> str | None:
    """Why an nn.Linear weight cannot be swapped for a packed one, or None when it can."""
    try:
        check_packable(weight)
    except UsageError as exc:
        return str(exc).removeprefix("weight: ")
    return None


def sparsify_(model: nn.Module, layout: str = "cutlass") -> dict[str, str | None]:
    """Swap the weight of every 2:4-valid nn.Linear of `model` (in place) for a packed semi-structured
    tensor, so that `model(x)` runs sparse tensor-core matmuls. Layers that are not 2:4 or break the
    shape limits are left dense, each with a logged reason. Returns {module name: None if swapped, else
    the reason}. Needs the model on a CUDA GPU of compute capability 8.0 or newer."""
    if layout not in LAYOUTS:
        raise UsageError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(model, nn.Module):
        raise UsageError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    devices = {m.weight.device for m in linears.values()}
    if any(d.type != "cuda" for d in devices):
        raise UsageError("sparsify_: 2:4 sparse matmuls run only on a CUDA GPU (compute capability 8.0+); "
                         f"the model's linear layers are on {', '.join(sorted(str(d) for d in devices))}")
    for device in devices:
        if (why := sparse_device_problem(device)) is not None:
            raise UsageError(f"sparsify_: {why}")
    outcome: dict[str, str | None] = {}
    for name, module in linears.items():
        reason = skip_reason(module.weight)
        if reason is None:
            module.weight = nn.Parameter(pack_24(module.weight, layout), requires_grad=False)
        else:
            log.info("sparsify_: %s stays dense: %s", name, reason)
        outcome[name] = reason
    return outcome
