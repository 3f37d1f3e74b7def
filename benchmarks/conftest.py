"""Shared set-up of the kernel benchmarks: GPU only (on a CPU only correctness is claimed), timed
callables that synchronise the device, bytes moved and GB/s attached to every result."""

import pytest
import torch

# (out, in) of the Llama-2-7B and Llama-2-70B linears
LINEAR_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
TOKENS = [2048, 8192]
PROVIDERS = ["torch", "triton"]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="kernel benchmarks need a CUDA GPU")
        for item in items:
            item.add_marker(skip)


def implementation(provider):
    from unipruning.backends import implementation as impl

    return impl(provider)


@pytest.fixture
def measure(benchmark):
    """measure(fn, bytes_moved, flops=None): time fn (synchronised) and record bytes, median ms, GB/s
    (and TFLOP/s when flops are given)."""

    def run(fn, bytes_moved, rounds=10, flops=None):
        def call(*args):
            fn(*args)
            torch.cuda.synchronize()

        # the median: a first call can carry a one-off JIT compilation of a new specialization
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=3, iterations=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update({"bytes": int(bytes_moved), "ms": median * 1e3,
                                     "mean_ms": benchmark.stats.stats.mean * 1e3, "gbps": bytes_moved / median / 1e9})
        if flops is not None:
            benchmark.extra_info.update({"flops": int(flops), "tflops": flops / median / 1e12})

    return run
