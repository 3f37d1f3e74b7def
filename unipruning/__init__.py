"""unipruning: UniPruning's mirror-descent saliency for LLMs, masks for any sparsity and pattern.

    from unipruning import PruneConfig, MaskSpec, prune, apply_masks
    result = prune(model, token_windows, PruneConfig(mask=MaskSpec(sparsity=0.6)))
    apply_masks(model, result.masks)                        # 60% unstructured
    apply_masks(model, result.saliency.masks(model, MaskSpec(pattern="2:4")))   # or 2:4, no recalibration
    sparsify_(model.half().cuda())          # 2:4 layers -> sparse tensor-core matmuls

Importing this package never initialises CUDA.
"""

__version__ = "0.1.0"

from .api import PruneResult, mask_checkpoint, prune, prune_checkpoint
from .config import MaskSpec, PruneConfig
from .errors import UsageError
from .evaluate import evaluate_checkpoint, perplexity
from .masks import apply_masks, compute_masks
from .packed_checkpoint import load_packed, pack_checkpoint
from .packing import pack_24, sparsify_, unpack_24
from .saliency import Saliency
from .targeting import Targeting

__all__ = [
    "MaskSpec",
    "PruneConfig",
    "PruneResult",
    "Saliency",
    "Targeting",
    "UsageError",
    "apply_masks",
    "compute_masks",
    "evaluate_checkpoint",
    "load_packed",
    "mask_checkpoint",
    "pack_24",
    "pack_checkpoint",
    "perplexity",
    "prune",
    "prune_checkpoint",
    "sparsify_",
    "unpack_24",
]
