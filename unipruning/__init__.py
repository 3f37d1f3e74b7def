"""unipruning: UniPruning's mirror-descent saliency for LLMs, masks for any sparsity and pattern.

    from unipruning import PruneConfig, MaskSpec, prune, apply_masks
    result = prune(model, token_windows, PruneConfig(mask=MaskSpec(sparsity=0.6)))
    apply_masks(model, result.masks)                        # 60% unstructured
    apply_masks(model, result.saliency.masks(model, MaskSpec(pattern="2:4")))   # or 2:4, no recalibration

Importing this package never initialises CUDA.
"""

__version__ = "0.1.0"

from .api import PruneResult, mask_checkpoint, prune, prune_checkpoint
from .config import MaskSpec, PruneConfig
from .errors import UsageError
from .evaluate import evaluate_checkpoint, perplexity
from .masks import apply_masks, compute_masks
from .saliency import Saliency

__all__ = [
    "MaskSpec",
    "PruneConfig",
    "PruneResult",
    "Saliency",
    "UsageError",
    "apply_masks",
    "compute_masks",
    "evaluate_checkpoint",
    "mask_checkpoint",
    "perplexity",
    "prune",
    "prune_checkpoint",
]
