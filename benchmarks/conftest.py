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
    """measure(fn, bytes_moved, setup=None): time fn (synchronised) and record bytes and GB/s."""

    def run(fn, bytes_moved, setup=None, rounds=10):
        def call(*args):
            fn(*args)
            torch.cuda.synchronize()

        if setup is None:
            benchmark.pedantic(call, rounds=rounds, warmup_rounds=2, iterations=1)
        else:
            benchmark.pedantic(call, setup=lambda: (setup(), {}), rounds=rounds, warmup_rounds=2, iterations=1)
        mean = benchmark.stats.stats.mean
        benchmark.extra_info.update({"bytes": int(bytes_moved), "ms": mean * 1e3,
                                     "gbps": bytes_moved / mean / 1e9})

    return run
