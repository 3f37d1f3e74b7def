"""The registry of the local metrics: every place that names a metric or forms its score reads it here.

A metric's score for W (out, in), with n_j = E_tokens[x_j^2] and the channel factor f_j = n_j^p:

    normaliser "none"     S_ij = |W_ij| f_j                                       magnitude (p = 0), wanda
    normaliser "full"     S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) f_j           ria
    normaliser "subsets"  the same with the row and column sums taken over keyed subsets of exactly
                          tau = max(1, floor(beta min(out, in))) entries                        stochria

then S / mean(S). The sums are clamped below at SUM_FLOOR. Readers: config (the names a user may pass),
the shared step-vector code and the twins (kernels/shared.py, kernels/reference.py), the reduction kernel
(kernels/metrics.py), the closed form (algorithm/closed_form.py), and docs/method.md's table, which
tests/test_reference.py holds to this one. Pure Python: config imports it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

NORMALISERS = ("none", "full", "subsets")
SUM_FLOOR = 1e-12  # the row and column sums are clamped below at this
STOCHRIA_BETA = 0.2  # stochria's subset size, as a fraction of min(out, in)


@dataclass(frozen=True)
class Metric:
    name: str
    channel_exponent: float  # f_j = n_j ** channel_exponent; 0: the metric reads no activations
    normaliser: str  # one of NORMALISERS

    @property
    def needs_activations(self) -> bool:
        return self.channel_exponent != 0

    @property
    def row_sums(self) -> bool:
        """Whether S carries the ria normalisers (row and column sums of |W|)."""
        return self.normaliser != "none"


REGISTRY = {m.name: m for m in (
    Metric("magnitude", 0.0, "none"),
    Metric("wanda", 0.5, "none"),
    Metric("ria", 0.25, "full"),  # n_j ** (a / 2) with RIA's a = 0.5
    Metric("stochria", 0.35, "subsets"),
)}
METRICS = tuple(REGISTRY)


def metric_spec(name: str) -> Metric:
    """The registry's entry; ValueError naming the known metrics otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {name!r}")
    return REGISTRY[name]


def stochria_tau(rows: int, cols: int, beta: float = STOCHRIA_BETA) -> int:
    """The size of every stochria subset of a (rows, cols) matrix."""
    return max(1, int(beta * min(rows, cols)))
