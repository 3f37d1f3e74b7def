"""unipruning.kernels: pure compute (tensors in, tensors out).

`reference` holds the torch twin of every kernel (CPU fallback and test oracle). The Triton kernels
are not implemented yet: `unipruning.backends.available()` reports `triton` as unavailable.
"""
