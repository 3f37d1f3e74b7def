"""unipruning.kernels: pure compute (tensors in, tensors out).

`reference` holds the torch twin of every kernel (the CPU fallback and the test oracle); the Triton
kernels (act_stats, metrics, mirror, select, nm, obs) match their twins and are exposed under the twins'
names by `triton_backend`, and as torch.library custom ops by `library`. `unipruning.backends` says
which can run here.
"""
