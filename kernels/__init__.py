"""unipruning.kernels: pure compute (tensors in, tensors out).

`reference` holds the torch twin of every kernel, the oracle the tests compare the kernels with; `shared`
the torch code every backend runs; `metric_registry` the metrics. The Triton kernels (act_stats,
metrics, mirror, select, nm, obs) match their twins and are exposed under the twins' names by
`triton_backend`, and as torch.library custom ops by `library`; `torch_backend` is the torch fallback
under the same names. `unipruning.backends` says which can run.
"""

if __name__ == "kernels":
    # Imported under the bare name `kernels`: the repository root is on sys.path (`python -m ...` or a script
    # run from a clone) and this directory shadows Hugging Face's `kernels`, a dependency of transformers
    # >= 5.25 that `import transformers` loads. Step aside: load the distribution's package in our place.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this clone's kernels/ is unipruning.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
