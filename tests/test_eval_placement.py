"""Where `eval` puts a model: on the compute device when it fits, else spread by accelerate (device_map
"auto"), as a 70B model needs. The choice is tested with the free memory given; the device-map path runs on
the CPU with {"": "cpu"} and must give the perplexity of the plain path."""

import pytest
import torch

from tests._utils import read_all
from unipruning.config import EvalOptions
from unipruning.evaluate import _need_bytes, evaluate_checkpoint, placement
from unipruning.io.checkpoint import load_config

GIB = 2**30


def test_a_model_that_fits_stays_on_the_device_and_one_that_does_not_is_spread():
    gpu = torch.device("cuda")  # constructing it needs no GPU; free memory is given
    assert placement(10 * GIB, gpu, free_bytes=80 * GIB) == "device"
    assert placement(140 * GIB, gpu, free_bytes=80 * GIB) == "auto"  # a 70B model in bf16 on one 80 GB GPU
    assert placement(140 * GIB, torch.device("cpu")) == "device"  # nowhere else to go


def test_the_need_counts_weights_with_margin_and_a_batch_of_logits(tiny_llama):
    config = load_config(tiny_llama)
    params = sum(t.numel() for t in read_all(tiny_llama).values())
    weights_only = _need_bytes(tiny_llama, torch.float32, config, batch_size=0, seqlen=64)
    assert weights_only == int(params * 4 * 1.2)
    with_logits = _need_bytes(tiny_llama, torch.float32, config, batch_size=2, seqlen=64)
    assert with_logits - weights_only == 2 * 2 * 64 * config.vocab_size * 4


def test_a_device_map_gives_the_perplexity_of_the_plain_path(tiny_llama, text_file):
    plain = evaluate_checkpoint(tiny_llama, text_file, 64, EvalOptions(device="cpu"), where="device")
    mapped = evaluate_checkpoint(tiny_llama, text_file, 64, EvalOptions(device="cpu"), where={"": "cpu"})
    assert plain["placement"] == "device" and mapped["placement"] == {"": "cpu"}
    assert mapped["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)
    assert evaluate_checkpoint(tiny_llama, text_file, 64, EvalOptions(device="cpu"))["placement"] == "device"
