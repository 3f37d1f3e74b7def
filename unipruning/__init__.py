"""unipruning: UniPruning's mirror-descent saliency for LLMs, masks for any sparsity and pattern.

    from unipruning import PruneConfig, MaskSpec, prune, apply_masks
    result = prune(model, token_windows, PruneConfig(mask=MaskSpec(sparsity=0.6)))
    apply_masks(model, result.masks)                        # 60% unstructured
    apply_masks(model, result.saliency.masks(model, MaskSpec(pattern="2:4")))   # or 2:4, no recalibration
    sparsify_(model.half().cuda())          # 2:4 layers -> sparse tensor-core matmuls

Importing this package never initialises CUDA.
"""

from .algorithm.masks import compute_masks
from .config import Calibration, MaskConfig, MaskSpec, PruneConfig, RunOptions
from .errors import UsageError
from .evaluate import evaluate_checkpoint, perplexity
from .io.report import Report
from .io.saliency import Saliency
from .jobs import PruneResult, apply_masks, mask_checkpoint, prune, prune_checkpoint
from .packing import load_packed, pack_24, pack_checkpoint, sparsify_, unpack_24
from .targeting import Targeting
from .version import __version__  # noqa: F401

__all__ = [
    "Calibration",
    "MaskConfig",
    "MaskSpec",
    "PruneConfig",
    "PruneResult",
    "Report",
    "RunOptions",
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
