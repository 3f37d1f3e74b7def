"""The mirror-descent saliency (docs/method.md, "The saliency"): its state and its update.

Per prunable matrix: z (float32, shaped like W, starting at 0) and the scalar threshold t; the saliency
Gamma = max(z - t, 0) is implicit. One calibration step k, from the local score S_k of that step:

    z <- z + kappa * (S_k - max(z - t, 0))
    t <- the m-th smallest z, m = max(1, floor(lam * numel))   (exact selection)

`MirrorState.update` runs that step for every matrix from the step's activation statistics; it is shared
by feedback none (frozen weights, layer-streamed) and full (weights along a fine-tuning trajectory).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import ops
from ..config import PruneConfig
from .masks import floor_count
from .metrics import ActivationStats, step_key


def mirror_step(z: torch.Tensor, previous: tuple[float, int], weight: torch.Tensor, stats: ActivationStats | None,
                config: PruneConfig, key: int, backend: str) -> tuple[float, int]:
    """One step for one matrix: S_k from W and the step's statistics, the z update, the new threshold.
    previous: the (t, hint) the last step returned; returns (t_k, hint): the hint lets a fused kernel
    gather t's candidates during the next update; the result never depends on it."""
    sqsum, tokens = (stats.sqsum, stats.tokens) if stats is not None else (None, 0)
    vectors = ops.step_vectors(weight, sqsum, tokens, config.metric, key, backend)
    m = max(1, floor_count(config.lam, z.numel()))
    return ops.mirror_step_(z, weight, vectors, config.kappa, m, previous, backend=backend)


class MirrorState:
    """z, t and the count of informative steps of each matrix ({name: source}: the input it reads).

    A step in which a matrix's input saw no token (an MoE expert the router did not pick) carries no
    information about it: its saliency is left as it was. An expert never routed to keeps z = 0, so its
    mask is cut by |W| (the ranking's second key): the report lists such experts."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], devices: Mapping[str, torch.device],
                 config: PruneConfig, backend: str):
        self.config, self.backend = config, backend
        self.z = {n: torch.zeros(shape, dtype=torch.float32, device=devices[n]) for n, shape in shapes.items()}
        self.t = dict.fromkeys(self.z, 0.0)
        self._hints = dict.fromkeys(self.z, -1)  # kernel-side acceleration of the selection, not state
        self.steps = dict.fromkeys(self.z, 0)

    def update(self, k: int, weights: Mapping[str, torch.Tensor], sources: Mapping[str, str],
               stats: Mapping[str, ActivationStats]) -> None:
        """Step k (the global step index, which keys the stochria subsets) for every matrix."""
        for name in self.z:
            st = stats.get(sources[name])
            if st is not None and st.tokens == 0:
                continue
            key = step_key(self.config.seed, name, k)
            previous = (self.t[name], self._hints[name])
            self.t[name], self._hints[name] = mirror_step(self.z[name], previous, weights[name], st, self.config,
                                                          key, self.backend)
            self.steps[name] += 1

    def unseen(self) -> list[str]:
        return [name for name, count in self.steps.items() if count == 0]
