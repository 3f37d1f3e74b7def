"""unipruning.kernels: pure compute (tensors in, tensors out).

`reference` holds the torch twin of every kernel, the oracle the tests compare the kernels with; `shared`
the torch code every backend runs; `metric_registry` the metrics. The Triton kernels (act_stats,
metrics, mirror, select, nm, obs) match their twins and are exposed under the twins' names by
`triton_backend`, and as torch.library custom ops by `library`; `torch_backend` is the torch fallback
under the same names. `unipruning.backends` says which can run.
"""
