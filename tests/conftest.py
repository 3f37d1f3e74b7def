"""Test set-up: interpreter mode for Triton without a GPU (before any kernel module is imported),
seeded randomness, and the tiny checkpoints shared by the tests."""

import os


def _pin_cpu_capability() -> None:
    """torch's AVX2 kernels on every x86 machine that has them: AVX512 ones round some reductions
    differently, so the golden hashes (tests/test_golden.py) and exact comparisons would hold on one kind
    of CI machine only. Subprocesses inherit it. Set before torch is imported (it reads it once)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return
    if " avx2" in flags:
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")


_pin_cpu_capability()

import torch  # noqa: E402

if not torch.cuda.is_available():
    # The mode is fixed when a kernel's decorator runs, so it must be set before any import of them.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests._utils import make_checkpoint, make_text_file  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A calibration/eval text (two packaged plays) as a .txt file."""
    return make_text_file(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama checkpoint (2 blocks, fp32, untied) with a tokenizer."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama_bf16_tied(tmp_path_factory):
    """The same architecture stored in bf16 with tied embeddings and a generation config."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_tied"), dtype=torch.bfloat16, tie=True)
