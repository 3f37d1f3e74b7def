"""Layer streaming: the lazy checkpoint path (prune on a directory) holds one block at a time and
learns the same saliency as the in-memory path."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests._utils import in_memory_job, make_checkpoint, read_all, tokenizer, weight_files
from unipruning import MaskSpec, PruneConfig, prune
from unipruning.cli import main
from unipruning.data import calibration_windows
from unipruning.io.checkpoint import LazyCheckpoint, load_config
from unipruning.models import decoder_blocks


@pytest.mark.parametrize("dtype,tie", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)])
def test_lazy_prune_equals_in_memory_prune(tmp_path, text_file, dtype, tie):
    source = make_checkpoint(tmp_path / "model", dtype=dtype, tie=tie, layers=3)
    out = tmp_path / "out"
    assert main(["prune", "--model", source, "--out", str(out), "--calib", text_file, "--nsamples", "6",
                 "--seqlen", "32", "--sparsity", "0.6"]) == 0
    windows = calibration_windows(tokenizer(), text_file, 6, 32, seed=0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    result = prune(model, windows, PruneConfig(mask=MaskSpec(sparsity=0.6)))
    lazy = read_all(out / "saliency")
    for name, z in result.saliency.z.items():
        assert torch.equal(lazy[f"{name}.z"], z), name


def test_only_one_block_is_ever_materialised(tmp_path, text_file, monkeypatch):
    source = make_checkpoint(tmp_path / "model", layers=4)
    seen = []
    real_load = LazyCheckpoint.load_block

    def load_block(self, model, index, device, dtype):
        real = [i for i, b in enumerate(decoder_blocks(model)) if not next(b.parameters()).is_meta]
        seen.append((index, real))
        return real_load(self, model, index, device, dtype)

    monkeypatch.setattr(LazyCheckpoint, "load_block", load_block)
    assert main(["prune", "--model", source, "--out", str(tmp_path / "out"), "--calib", text_file,
                 "--nsamples", "2", "--seqlen", "16"]) == 0
    assert seen == [(0, []), (1, []), (2, []), (3, [])]


def test_skeleton_rebuilds_computed_buffers_and_ties(tmp_path):
    source = make_checkpoint(tmp_path / "model", tie=True)
    checkpoint = LazyCheckpoint(source, load_config(source))
    model = checkpoint.skeleton(torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert all(p.is_meta for p in decoder_blocks(model).parameters())
    block = checkpoint.load_block(model, 1, torch.device("cpu"), torch.float32)
    for a, b in zip(block.parameters(), reference.model.layers[1].parameters(), strict=True):
        assert torch.equal(a, b)
    checkpoint.release_block(model, 1)
    assert all(p.is_meta for p in decoder_blocks(model)[1].parameters())


@pytest.mark.slow  # budget: 20 s on 2 CPU cores (measured 8-10 s: three prunes of a 4-block model)
def test_sigkill_then_same_command_resumes_to_identical_files(tmp_path, text_file):
    import json
    import os
    import signal
    import subprocess
    import time

    source = make_checkpoint(tmp_path / "model", layers=4, hidden=64, intermediate=128)
    args = ["--model", source, "--calib", text_file, "--nsamples", "64", "--seqlen", "64", "--sparsity", "0.6"]
    assert main(["prune", *args, "--out", str(tmp_path / "reference")]) == 0

    out = tmp_path / "resumed"
    proc = subprocess.Popen(["unipruning", "prune", *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    partial = None
    while time.time() < deadline and proc.poll() is None:
        found = [d for d in os.listdir(tmp_path) if d.startswith(".resumed.partial-")]
        if found and os.path.exists(tmp_path / found[0] / ".blocks" / "block-00001.safetensors"):
            partial = found[0]
            break
        time.sleep(0.05)
    assert partial is not None and proc.poll() is None, "the run ended before two blocks were done"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and (tmp_path / partial).is_dir()

    assert main(["prune", *args, "--out", str(out)]) == 0
    assert not (tmp_path / partial).exists()
    report = json.loads((out / "pruning_report.json").read_text())
    assert [b["resumed"] for b in report["blocks"]][:2] == [True, True]
    reference = tmp_path / "reference"
    saliency_files = sorted(os.listdir(reference / "saliency"))
    assert sorted(os.listdir(out / "saliency")) == saliency_files and len(saliency_files) == 4 + 2
    assert weight_files(out) == weight_files(reference)
    for name in ["config.json"] + [f"saliency/{f}" for f in saliency_files]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_overwrite_keeps_the_partial_state_and_a_corrupt_block_is_redone(tmp_path, text_file, monkeypatch):
    """A partial directory of the same run with a corrupt finished block: --overwrite does not discard the
    partial state (it only replaces --out when the run succeeds), the whole block is resumed and the
    corrupt one calibrated again, to the bytes of an uninterrupted run."""
    import json
    import os

    import unipruning.io.saliency as sal

    source = make_checkpoint(tmp_path / "model", layers=2)
    args = ["prune", "--model", source, "--calib", text_file, "--nsamples", "2", "--seqlen", "16"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    real_save, partials = sal.save_block, []

    def crash_after_first_block(state_dir, index, *rest):
        real_save(state_dir, index, *rest)
        partials.append(state_dir)
        with open(os.path.join(state_dir, "block-00001.safetensors"), "wb") as f:
            f.write(b"corrupt")
        raise KeyboardInterrupt

    monkeypatch.setattr(sal, "save_block", crash_after_first_block)
    assert main(args + ["--out", str(tmp_path / "b")]) == 130
    monkeypatch.undo()
    assert os.path.isfile(os.path.join(partials[0], "block-00001.safetensors"))
    assert main(args + ["--out", str(tmp_path / "b"), "--overwrite"]) == 0
    assert not [d for d in os.listdir(tmp_path) if ".partial-" in d]
    report = json.loads((tmp_path / "b" / "pruning_report.json").read_text())
    assert [b["resumed"] for b in report["blocks"]] == [True, False]
    assert weight_files(tmp_path / "b") == weight_files(tmp_path / "a")



def test_micro_batches_and_batch_slicing(tiny_llama, text_file, monkeypatch):
    """A step's windows run in micro-batches (keyword arguments sliced along the batch): the saliency
    matches the whole-batch forward to rounding, and every token reaches the statistics."""
    import unipruning.pipeline.stream as stream_module
    from unipruning.pipeline.calibrate import calibrate
    from unipruning.pipeline.stream import _batch_slice

    pos = (torch.ones(4, 6, 2), torch.zeros(1, 6, 2))
    sliced = _batch_slice(pos, 1, 3, 4)
    assert sliced[0].shape == (2, 6, 2) and sliced[1].shape == (1, 6, 2)  # broadcast ones stay whole
    assert _batch_slice(None, 0, 1, 4) is None

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    windows = calibration_windows(AutoTokenizer.from_pretrained(tiny_llama), text_file, 8, 32, 0)
    config = PruneConfig(batch_size=4)
    job = in_memory_job(windows, config, torch.device("cpu"))
    whole, _ = calibrate(job, model, config)
    monkeypatch.setattr(stream_module, "MAX_TOKENS", 40)  # one window (32 tokens) per forward
    chunked, _ = calibrate(job, model, config)
    for name in whole.z:
        torch.testing.assert_close(chunked.z[name], whole.z[name], rtol=1e-5, atol=1e-6)


def test_offloaded_transfers_prefetch_the_next_micro_batch(tiny_llama, text_file, monkeypatch):
    """Offloaded activations go through _Transfers: each micro-batch is fetched while the previous one
    computes (every fetch but a block's very first is served by the copy started one call earlier) and
    outputs go back into their own rows; the saliency is bit-identical to the resident stream's. On the
    CPU the bookkeeping runs with plain copies; on a GPU the copies are on a side stream."""
    import dataclasses

    import unipruning.pipeline.blocks as blocks_module
    import unipruning.pipeline.stream as stream_module
    from unipruning.pipeline.calibrate import calibrate

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    windows = calibration_windows(AutoTokenizer.from_pretrained(tiny_llama), text_file, 8, 32, 0)
    config = PruneConfig(batch_size=4)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(stream_module, "MAX_TOKENS", 64)  # 2 windows per forward: 2 micro-batches per step
    job = in_memory_job(windows, config, device, offload="never")
    resident, _ = calibrate(job, model, config)
    capture, streams = blocks_module.capture_block_inputs, []
    resident_stream = capture(model, [windows[:4]], device, "never")  # on a GPU: the leaves go back to the CPU
    assert not resident_stream.offloaded and resident_stream.transfers is None

    def offloaded_capture(*args):
        stream = capture(*args)
        hidden = [h.cpu().pin_memory() if device.type == "cuda" else h.cpu() for h in stream.hidden]
        stream = dataclasses.replace(stream, hidden=hidden, offloaded=True)
        streams.append(stream)
        return stream

    monkeypatch.setattr(blocks_module, "capture_block_inputs", offloaded_capture)
    offloaded, _ = calibrate(job, model, config)
    blocks, steps, chunks = model.config.num_hidden_layers, 2, 2
    assert streams[0].transfers.prefetched == blocks * (steps * chunks - 1)
    for name in resident.z:
        assert torch.equal(offloaded.z[name], resident.z[name]), name


def test_activation_home():
    from unipruning import UsageError
    from unipruning.pipeline.stream import activation_home

    cpu = torch.device("cpu")
    assert activation_home(cpu, 1 << 40, "always") == cpu  # nothing to offload from
    with pytest.raises(UsageError, match="`offload`: expected one of"):
        activation_home(cpu, 1, "sometimes")
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        assert activation_home(gpu, 1, "always") == cpu and activation_home(gpu, 1, "auto") == gpu
        assert activation_home(gpu, torch.cuda.mem_get_info()[0], "auto") == cpu


def test_global_masks_read_one_matrix_at_a_time(tiny_llama, text_file, tmp_path, monkeypatch):
    """--allocation global with no room to cache keys (each pass recomputes them from z and W on disk)
    cuts the same masks as with every key cached."""
    import unipruning.algorithm.masks as masks_module

    pruned = tmp_path / "p"
    assert main(["prune", "--model", tiny_llama, "--out", str(pruned), "--calib", text_file, "--nsamples", "4",
                 "--seqlen", "32", "--allocation", "global", "--sparsity", "0.7"]) == 0
    monkeypatch.setattr(masks_module, "KEY_CACHE_BYTES", 0)
    streamed = tmp_path / "m"
    assert main(["mask", "--model", tiny_llama, "--saliency", str(pruned / "saliency"), "--out", str(streamed),
                 "--allocation", "global", "--sparsity", "0.7"]) == 0
    a, b = read_all(pruned), read_all(streamed)
    assert all(torch.equal(a[k], b[k]) for k in a)
