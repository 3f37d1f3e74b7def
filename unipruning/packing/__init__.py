"""2:4 sparse weights for sparse tensor cores: the packed formats and `sparsify_` (formats.py), packed
checkpoints, `unipruning pack` and `load_packed` (packed.py), and FP8 + 2:4 checkpoints for torchao's
sparse FP8 kernel (fp8.py, `unipruning pack --format fp8-2:4`)."""

from .formats import (
    LAYOUTS,
    PACKABLE_DTYPES,
    cutlass_tensor,
    extension,
    pack_24,
    pack_cutlass_torch,
    skip_reason,
    sparsify_,
    unpack_24,
    unpack_cutlass_torch,
)
from .fp8 import export_fp8_24, load_fp8_24
from .packed import load_packed, pack_checkpoint

__all__ = ["LAYOUTS", "PACKABLE_DTYPES", "cutlass_tensor", "export_fp8_24", "extension", "load_fp8_24", "load_packed",
           "pack_24", "pack_checkpoint",
           "pack_cutlass_torch", "skip_reason", "sparsify_", "unpack_24", "unpack_cutlass_torch"]
