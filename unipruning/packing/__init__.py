"""2:4 sparse weights for sparse tensor cores: the packed formats and `sparsify_` (formats.py), and packed
checkpoints, `unipruning pack` and `load_packed` (checkpoint.py)."""

from .checkpoint import load_packed, pack_checkpoint
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

__all__ = ["LAYOUTS", "PACKABLE_DTYPES", "cutlass_tensor", "extension", "load_packed", "pack_24", "pack_checkpoint",
           "pack_cutlass_torch", "skip_reason", "sparsify_", "unpack_24", "unpack_cutlass_torch"]
