"""unipruning: UniPruning's mirror-descent saliency for LLMs, masks for any sparsity and pattern.

    from unipruning import PruneConfig, MaskSpec, prune, apply_masks
    result = prune(model, token_windows, PruneConfig(mask=MaskSpec(sparsity=0.6)))
    apply_masks(model, result.masks)                        # 60% unstructured
    apply_masks(model, result.saliency.masks(model, MaskSpec(pattern="2:4")))   # or 2:4, no recalibration
    sparsify_(model.half().cuda())          # 2:4 layers -> sparse tensor-core matmuls

Importing this package never initialises CUDA and imports neither torch nor transformers nor triton: each
public name is imported from its module when it is first used (PEP 562), so `unipruning --help` and the
option objects cost no heavy import (tests/test_lean_import.py).
"""

from __future__ import annotations

import importlib
import importlib.util

from .version import __version__  # noqa: F401

# {public name: the module that defines it}
_EXPORTS = {
    "Calibration": "config", "EvalOptions": "config", "MaskConfig": "config", "MaskSpec": "config",
    "PruneConfig": "config", "RunOptions": "config",
    "UsageError": "errors",
    "compute_masks": "algorithm.masks",
    "evaluate_checkpoint": "evaluate", "perplexity": "evaluate",
    "Report": "io.report",
    "Saliency": "io.saliency",
    "PruneResult": "jobs", "apply_masks": "jobs", "mask_checkpoint": "jobs", "prune": "jobs",
    "prune_checkpoint": "jobs",
    "load_packed": "packing", "pack_24": "packing", "pack_checkpoint": "packing", "sparsify_": "packing",
    "unpack_24": "packing",
    "Targeting": "targeting",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: unipruning.io.hub...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'unipruning' has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
