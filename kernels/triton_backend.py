"""The Triton backend: every kernel under the name and signature of its twin in reference.py.

`unipruning.backends` imports this module only when Triton can run (a GPU, or TRITON_INTERPRET=1).
The per-step small vectors come from one Triton reduction pass (metrics.py) finished by the shared
float64 torch code (`shared.finish_step_vectors`). The per-row top-k and the global water-filling are
the shared torch code of both backends (shared.py). Nothing here imports the oracle (reference.py).
"""

from .act_stats import act_sqsum_triton as act_sqsum_
from .metrics import step_vectors_triton as step_vectors
from .mirror import candidate_step_triton as candidate_step_
from .mirror import mirror_step_triton as mirror_step_
from .mirror import mirror_update_triton as mirror_update_
from .nm import nm_mask_triton as nm_mask
from .obs import hessian_accumulate_triton as hessian_accumulate_
from .obs import obs_sweep_triton as obs_sweep_
from .select import kth_smallest_triton as kth_smallest
from .select import rank_keys_triton as rank_keys
from .select import topk_mask_triton as topk_mask
from .shared import global_keep_counts, row_topk_mask

__all__ = [
    "act_sqsum_",
    "candidate_step_",
    "global_keep_counts",
    "hessian_accumulate_",
    "kth_smallest",
    "mirror_step_",
    "mirror_update_",
    "nm_mask",
    "obs_sweep_",
    "rank_keys",
    "row_topk_mask",
    "step_vectors",
    "topk_mask",
]
from . import library  # noqa: F401,E402  (registers the custom ops)
