"""Faults (issue 14): nothing a user has is ever lost, and every fault is one clear line.

Each case asserts the exit code (2 bad input, 1 environment, 130 interrupted), exactly one line on stderr
without a traceback, every file that existed before byte-identical, and no partial directory or lock left
that is not resumable; resumed runs must equal uninterrupted ones byte for byte. The filesystem cases
(read-only and full tmpfs mounts) need root and skip without it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests._utils import make_checkpoint, without_progress
from unipruning.cli import main
from unipruning.io import staging

SMALL = ["--nsamples", "4", "--seqlen", "16"]
WEIGHTS = "model.safetensors"
BLOCK0 = "model.layers.0.mlp.down_proj.weight"


# ------------------------------------------------------------------------------------------ helpers
def snapshot(root) -> dict[str, str]:
    """{path: sha256} of every file under `root`."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    files[path] = hashlib.sha256(f.read()).hexdigest()
    return files


def leftovers(root) -> list[str]:
    """Partial directories, moved-aside outputs and locks anywhere under `root`."""
    found = []
    for dirpath, dirnames, names in os.walk(root):
        found += [os.path.join(dirpath, n) for n in dirnames + names
                  if ".partial-" in n or n.endswith(".lock") or ".old-" in n]
    return found


def run(capsys, *argv) -> tuple[int, str, str]:
    # logging.basicConfig binds the stderr of the first test that calls main(); drop that handler so that
    # this test's captured stderr sees the log lines too
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(handler)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, without_progress(captured.err)


def expect_fault(capsys, root, code: int, needle: str, *argv, written_ok: bool = False) -> str:
    """Run a command that must fail: exit `code`, one line on stderr containing `needle`, no traceback,
    every file under `root` unchanged, nothing new (unless `written_ok`) and no partial state left."""
    before, left = snapshot(root), set(leftovers(root))
    got, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and "Traceback" not in err and needle in err, (got, err)
    after = snapshot(root)
    assert {p: after.get(p) for p in before} == before, "a file that existed before changed or vanished"
    assert written_ok or set(after) == set(before), sorted(set(after) - set(before))
    assert set(leftovers(root)) == left, sorted(set(leftovers(root)) ^ left)  # the user's own are theirs
    return lines[0]


def copy_model(source, tmp_path, name="model") -> str:
    return shutil.copytree(source, tmp_path / name)


def edit_weights(model_dir, edit) -> None:
    """Rewrite model.safetensors with edit(tensors) applied (same names; shapes as edit leaves them)."""
    path = os.path.join(model_dir, WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(model_dir, **changes) -> None:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def prune_args(model, out, calib, *extra):
    return ["prune", "--model", model, "--out", out, "--calib", calib, *SMALL, *extra]


def interrupt_after_first_block(monkeypatch, at: int = 0):
    """Make the next prune stop (as Ctrl-C does) right after block `at`'s state is saved."""
    import unipruning.io.saliency as store

    real = store.save_block

    def save_then_stop(state_dir, index, *rest):
        real(state_dir, index, *rest)
        if index == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(store, "save_block", save_then_stop)


def report_of(out) -> dict:
    with open(os.path.join(out, "pruning_report.json")) as f:
        return json.load(f)


def output_bytes(out) -> dict[str, bytes]:
    """Every output file but the report (timings, paths) by relative path."""
    files = {}
    for dirpath, _, names in os.walk(out):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), out)
            if rel != "pruning_report.json":
                with open(os.path.join(dirpath, name), "rb") as f:
                    files[rel] = f.read()
    return files


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, source, text_file):
    out = tmp_path_factory.mktemp("pruned") / "p"
    assert main([str(a) for a in prune_args(source, out, text_file)]) == 0
    return str(out)


@contextlib.contextmanager
def tmpfs(path, size: str, readonly: bool = False):
    """A tmpfs mounted at `path` (root only; the test skips when mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------------------------------------------ inputs inside --out
def test_out_containing_the_calibration_text_is_refused_even_with_overwrite(capsys, tmp_path, source, text_file):
    data = tmp_path / "mydata"
    data.mkdir()
    shutil.copy(text_file, data / "calib.txt")
    (data / "notes.md").write_text("mine")
    expect_fault(capsys, tmp_path, 2, "--calib", *prune_args(source, data, data / "calib.txt"), "--overwrite")


def test_out_equal_to_the_tokenizer_recipe_or_include_inputs_is_refused(capsys, tmp_path, source, text_file):
    tok = shutil.copytree(source, tmp_path / "tok", ignore=shutil.ignore_patterns("*.safetensors"))
    expect_fault(capsys, tmp_path, 2, "--tokenizer", *prune_args(source, tok, text_file), "--tokenizer", tok,
                 "--overwrite")
    recdir = tmp_path / "recdir"
    recdir.mkdir()
    (recdir / "r.yaml").write_text("ignore: ['self_attn\\\\.o_proj']\n")
    expect_fault(capsys, tmp_path, 2, "--recipe", *prune_args(source, recdir, text_file), "--recipe",
                 recdir / "r.yaml", "--overwrite")
    texts = tmp_path / "texts"  # --out inside a calibration directory
    texts.mkdir()
    shutil.copy(text_file, texts / "a.txt")
    expect_fault(capsys, tmp_path, 2, "--calib", *prune_args(source, texts / "out", texts))


def test_mask_out_containing_its_calibration_or_saliency_is_refused(capsys, tmp_path, source, pruned, text_file):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(text_file, d / "c.txt")
    expect_fault(capsys, tmp_path, 2, "--calib", "mask", "--model", source, "--saliency", f"{pruned}/saliency",
                 "--out", d, "--reconstruct", "obs", "--calib", d / "c.txt", *SMALL, "--overwrite")
    expect_fault(capsys, tmp_path, 2, "--saliency", "mask", "--model", source, "--saliency", f"{pruned}/saliency",
                 "--out", pruned, "--overwrite")


def test_out_reaching_an_input_through_a_symbolic_link_is_refused(capsys, tmp_path, source, text_file):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(text_file, data / "calib.txt")
    os.symlink(data, tmp_path / "link")
    expect_fault(capsys, tmp_path, 2, "--calib", *prune_args(source, tmp_path / "link", data / "calib.txt"),
                 "--overwrite")


def test_overwrite_replaces_only_an_earlier_output(capsys, tmp_path, source, text_file):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    expect_fault(capsys, tmp_path, 2, "not an earlier unipruning output", *prune_args(source, mine, text_file),
                 "--overwrite")
    expect_fault(capsys, tmp_path, 2, "not an earlier unipruning output", "pack", "--model", source, "--out", mine,
                 "--overwrite")


def test_pack_and_demo_outs_must_not_hold_their_inputs(capsys, tmp_path, source, monkeypatch):
    expect_fault(capsys, tmp_path, 2, "--model", "pack", "--model", source, "--out", os.path.dirname(source),
                 "--overwrite")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "trained-model.txt").write_text("an hour of training")
    monkeypatch.setenv("UNIPRUNING_CACHE", str(cache))
    expect_fault(capsys, tmp_path, 2, "UNIPRUNING_CACHE", "demo", "--out", tmp_path, "--overwrite")


# ------------------------------------------------------------------------------------------ one run per --out
def _hold_lock(lock_path) -> subprocess.Popen:
    """Another process holding `lock_path` as a unipruning run does (flock, its PID inside)."""
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, str(os.getpid()).encode())\n"
            "print('held', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_locked_out_fails_at_once_naming_the_pid(capsys, tmp_path, source, pruned, text_file):
    holder = _hold_lock(tmp_path / ".o.lock")
    try:
        commands = [prune_args(source, tmp_path / "o", text_file),
                    [*prune_args(source, tmp_path / "o", text_file), "--dry-run"],
                    ["mask", "--model", source, "--saliency", f"{pruned}/saliency", "--out", tmp_path / "o"],
                    ["pack", "--model", pruned, "--out", tmp_path / "o"]]
        for argv in commands:
            before = snapshot(tmp_path)
            start = time.perf_counter()
            code, _, err = run(capsys, *argv)
            assert code == 2 and f"PID {holder.pid}" in err and len(err.strip().splitlines()) == 1, err
            assert time.perf_counter() - start < 60 and snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run(capsys, *prune_args(source, tmp_path / "o", text_file))
    assert code == 0, err
    assert not leftovers(tmp_path), leftovers(tmp_path)  # the lock goes with the run


# ------------------------------------------------------------------------------------------ identity by content
def test_resume_after_the_source_weights_changed_does_not_mix(capsys, tmp_path, source, text_file, monkeypatch):
    model = copy_model(source, tmp_path)
    args = prune_args(model, tmp_path / "o", text_file)
    interrupt_after_first_block(monkeypatch)
    code, _, err = run(capsys, *args)
    monkeypatch.undo()
    assert code == 130 and "resumes" in err and len(err.strip().splitlines()) == 1, err
    old_partial = [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert len(old_partial) == 1
    stat = os.stat(os.path.join(model, WEIGHTS))
    edit_weights(model, lambda t: t[BLOCK0].mul_(-1.5))  # block 0 changes, same shapes
    os.utime(os.path.join(model, WEIGHTS), ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert not any(b["resumed"] for b in report_of(tmp_path / "o")["blocks"])
    assert not leftovers(tmp_path), leftovers(tmp_path)  # the stale partial of the old weights is gone
    fresh = tmp_path / "fresh"
    assert run(capsys, *prune_args(model, fresh, text_file))[0] == 0
    assert output_bytes(tmp_path / "o") == output_bytes(fresh)


def test_mask_refuses_a_saliency_of_other_weights_with_the_same_config(capsys, tmp_path, pruned, text_file):
    other = make_checkpoint(tmp_path / "other", seed=1)  # same config, other weights
    expect_fault(capsys, tmp_path, 2, "other weights", "mask", "--model", other, "--saliency",
                 f"{pruned}/saliency", "--out", tmp_path / "o")


def test_mask_refuses_a_saliency_that_records_no_source(capsys, tmp_path, source, pruned):
    saliency = shutil.copytree(f"{pruned}/saliency", tmp_path / "sal")
    meta = json.loads((saliency / "saliency_config.json").read_text())
    del meta["source_sha256"]
    (saliency / "saliency_config.json").write_text(json.dumps(meta))
    expect_fault(capsys, tmp_path, 2, "not recorded", "mask", "--model", source, "--saliency", saliency, "--out",
                 tmp_path / "o")


# ------------------------------------------------------------------------------------------ --overwrite and resume
def test_an_interrupted_overwrite_run_resumes_with_the_same_command(capsys, tmp_path, source, text_file, monkeypatch):
    out = tmp_path / "o"
    assert run(capsys, *prune_args(source, out, text_file, "--sparsity", "0.7"))[0] == 0  # an earlier output
    earlier = snapshot(out)
    args = prune_args(source, out, text_file, "--overwrite")
    interrupt_after_first_block(monkeypatch)
    code, _, err = run(capsys, *args)
    monkeypatch.undo()
    partial = [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert code == 130 and len(partial) == 1 and str(tmp_path / partial[0]) in err, err
    assert len(err.strip().splitlines()) == 1 and snapshot(out) == earlier  # the earlier output is intact
    code, _, err = run(capsys, *args)  # the same command, --overwrite included
    assert code == 0, err
    assert [b["resumed"] for b in report_of(out)["blocks"]] == [True, False]
    reference = tmp_path / "reference"
    assert run(capsys, *prune_args(source, reference, text_file))[0] == 0
    assert output_bytes(out) == output_bytes(reference)
    assert not leftovers(tmp_path), leftovers(tmp_path)


def test_resuming_without_overwrite_finds_only_the_partial(capsys, tmp_path, source, text_file, monkeypatch):
    args = prune_args(source, tmp_path / "o", text_file)
    interrupt_after_first_block(monkeypatch)
    assert run(capsys, *args)[0] == 130
    monkeypatch.undo()
    code, _, err = run(capsys, *args)
    assert code == 0 and "not empty" not in err, err
    assert report_of(tmp_path / "o")["blocks"][0]["resumed"]


# ------------------------------------------------------------------------------------------ partial directories
def test_mask_leaves_no_partial_and_a_killed_ones_is_cleared(capsys, tmp_path, source, pruned, monkeypatch):
    import unipruning.pipeline.export as export

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    argv = ["mask", "--model", source, "--saliency", f"{pruned}/saliency", "--out", tmp_path / "o"]
    monkeypatch.setattr(export, "copy_side_files", stop)  # Ctrl-C in the middle of the export
    code, _, err = run(capsys, *argv)
    monkeypatch.undo()
    assert code == 130 and "nothing written" in err and len(err.strip().splitlines()) == 1, err
    assert not leftovers(tmp_path) and not (tmp_path / "o").exists()
    killed = tmp_path / ".o.partial-staged"  # what SIGKILL in the middle of a mask leaves: its marker inside
    killed.mkdir()
    staging._mark(str(killed), str(tmp_path / "o"), staging.STAGED)
    (killed / "model-00002-of-00003.safetensors").write_bytes(b"half")
    assert run(capsys, *argv)[0] == 0
    assert not leftovers(tmp_path), leftovers(tmp_path)


def test_success_removes_stale_partials_of_its_out_only(capsys, caplog, tmp_path, source, text_file, monkeypatch):
    interrupt_after_first_block(monkeypatch)
    assert run(capsys, *prune_args(source, tmp_path / "o", text_file, "--sparsity", "0.7"))[0] == 130
    assert run(capsys, *prune_args(source, tmp_path / "o2", text_file))[0] == 130
    monkeypatch.undo()
    stale = [p for p in os.listdir(tmp_path) if p.startswith(".o.partial-")]
    other = [p for p in os.listdir(tmp_path) if p.startswith(".o2.partial-")]
    assert len(stale) == len(other) == 1
    with caplog.at_level(logging.INFO, logger="unipruning"):
        code, _, err = run(capsys, *prune_args(source, tmp_path / "o", text_file))  # other settings: another run
    assert code == 0, err
    assert f"removed stale partial state {tmp_path / stale[0]} (" in caplog.text and "MiB)" in caplog.text
    assert sorted(p for p in os.listdir(tmp_path) if ".partial-" in p) == other  # o2's is not o's


def test_a_zero_byte_block_state_is_calibrated_again(capsys, tmp_path, source, text_file, monkeypatch):
    # one budget per matrix: its masks, hence its pruned shards, are written block by block (owl-row, the
    # default, waits for every block's saliency)
    args = prune_args(source, tmp_path / "o", text_file, "--allocation", "layer")
    interrupt_after_first_block(monkeypatch, at=1)  # block 0's state and pruned shard are written
    assert run(capsys, *args)[0] == 130
    monkeypatch.undo()
    (partial,) = [p for p in os.listdir(tmp_path) if ".partial-" in p]
    state = tmp_path / partial / ".blocks" / "block-00000.safetensors"
    state.write_bytes(b"")  # what a crash before the disk was flushed leaves
    shard = tmp_path / partial / "model-00002-of-00003.safetensors"
    assert shard.is_file()
    shard.write_bytes(shard.read_bytes()[:100])  # and a truncated pruned shard
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert [b["resumed"] for b in report_of(tmp_path / "o")["blocks"]] == [False, True]
    reference = tmp_path / "reference"
    assert run(capsys, *prune_args(source, reference, text_file, "--allocation", "layer"))[0] == 0
    assert output_bytes(tmp_path / "o") == output_bytes(reference)


# ------------------------------------------------------------------------------------------ damaged model files
def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _huge_header(path):
    data = open(path, "rb").read()
    open(path, "wb").write(struct.pack("<Q", 10**12) + data[8:])


@pytest.mark.parametrize("damage", [
    _truncate,
    lambda p: open(p, "wb").close(),
    lambda p: open(p, "wb").write(os.urandom(os.path.getsize(p))),
    _huge_header,
], ids=["truncated", "zero-bytes", "garbled", "header-1e12"])
def test_damaged_weights_are_one_line_for_every_command(capsys, tmp_path, source, pruned, text_file, damage):
    model = copy_model(source, tmp_path)
    damage(os.path.join(model, WEIGHTS))
    expect_fault(capsys, tmp_path, 2, WEIGHTS, *prune_args(model, tmp_path / "o", text_file))
    expect_fault(capsys, tmp_path, 2, WEIGHTS, *prune_args(model, tmp_path / "o", text_file), "--dry-run")
    expect_fault(capsys, tmp_path, 2, WEIGHTS, "mask", "--model", model, "--saliency", f"{pruned}/saliency",
                 "--out", tmp_path / "o")
    expect_fault(capsys, tmp_path, 2, WEIGHTS, "eval", "--model", model, "--data", text_file, "--seqlen", "16")
    expect_fault(capsys, tmp_path, 2, WEIGHTS, "pack", "--model", model, "--out", tmp_path / "o")


def _sharded(source, tmp_path) -> str:
    """A copy of `source` with its tensors in two shards and the standard index."""
    model = copy_model(source, tmp_path)
    tensors = load_file(os.path.join(model, WEIGHTS))
    os.remove(os.path.join(model, WEIGHTS))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(model, shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    with open(os.path.join(model, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return model


def test_sharded_checkpoint_faults(capsys, tmp_path, source, text_file):
    model = _sharded(source, tmp_path)
    index = os.path.join(model, "model.safetensors.index.json")
    good = open(index).read()
    open(index, "w").write(good[:-10])
    expect_fault(capsys, tmp_path, 2, "not a valid safetensors index", *prune_args(model, tmp_path / "o", text_file))
    open(index, "w").write(json.dumps({"weight_map": ["not", "a", "map"]}))
    expect_fault(capsys, tmp_path, 2, "not a valid safetensors index", *prune_args(model, tmp_path / "o", text_file))
    wrong = json.loads(good)
    wrong["weight_map"][BLOCK0] = "model-00001-of-00002.safetensors" if wrong["weight_map"][BLOCK0].startswith(
        "model-00002") else "model-00002-of-00002.safetensors"
    open(index, "w").write(json.dumps(wrong))
    expect_fault(capsys, tmp_path, 2, "does not hold it", *prune_args(model, tmp_path / "o", text_file))
    open(index, "w").write(good)
    os.rename(os.path.join(model, "model-00002-of-00002.safetensors"), tmp_path / "elsewhere.safetensors")
    expect_fault(capsys, tmp_path, 2, "missing", *prune_args(model, tmp_path / "o", text_file))
    expect_fault(capsys, tmp_path, 2, "missing", "eval", "--model", model, "--data", text_file, "--seqlen", "16")


def test_config_that_disagrees_with_the_weights(capsys, tmp_path, source, text_file):
    model = copy_model(source, tmp_path)
    edit_config(model, hidden_size=64)
    expect_fault(capsys, tmp_path, 2, "config.json implies", *prune_args(model, tmp_path / "o", text_file))
    expect_fault(capsys, tmp_path, 2, "config.json implies", "eval", "--model", model, "--data", text_file,
                 "--seqlen", "16")
    edit_config(model, hidden_size=32, vocab_size=256)  # config vocab smaller than the embedding's 512 rows
    expect_fault(capsys, tmp_path, 2, "model.embed_tokens.weight", *prune_args(model, tmp_path / "o", text_file))
    edit_config(model, vocab_size=512, num_hidden_layers=3)  # a block the weights do not have
    expect_fault(capsys, tmp_path, 2, "num_hidden_layers 3, but the weights hold 2 decoder blocks",
                 *prune_args(model, tmp_path / "o", text_file))
    edit_config(model, num_hidden_layers=2, num_attention_heads=5)  # transformers cannot build it
    expect_fault(capsys, tmp_path, 2, "config.json", *prune_args(model, tmp_path / "o", text_file))
    (tmp_path / "model" / "config.json").write_text("[1, 2]")
    expect_fault(capsys, tmp_path, 2, "not a JSON object", *prune_args(model, tmp_path / "o", text_file))


def test_tokenizer_vocabulary_larger_than_the_embedding(capsys, tmp_path, source, text_file):
    model = copy_model(source, tmp_path)

    def shrink(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name][:256].clone()

    edit_weights(model, shrink)
    edit_config(model, vocab_size=256)  # consistent with the weights, but the tokenizer has 512 ids
    expect_fault(capsys, tmp_path, 2, "token id", *prune_args(model, tmp_path / "o", text_file))
    expect_fault(capsys, tmp_path, 2, "token id", *prune_args(model, tmp_path / "o", text_file), "--dry-run")
    expect_fault(capsys, tmp_path, 2, "token id", "eval", "--model", model, "--data", text_file, "--seqlen", "16")


# ------------------------------------------------------------------------------------------ damaged texts
@pytest.mark.parametrize("name,content,needle", [
    ("random.txt", os.urandom(4096), "not UTF-8"),
    ("latin1.txt", ("Ophélie, à la fenêtre. " * 400).encode("latin-1"), "not UTF-8"),
    ("zeros.txt", b"\0" * 4096, "NUL bytes"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": oops}\n', "line 2 is not valid JSON"),
    ("number.jsonl", b'{"text": "fine"}\n{"text": 42}\n', "'text' is int"),
    ("null.jsonl", b'{"text": null}\n', "'text' is NoneType"),
    ("array.jsonl", b'["text"]\n', "no 'text' field"),
], ids=["random-bytes", "latin-1", "nul-bytes", "invalid-line", "number", "null", "array"])
def test_bad_text_is_one_line_naming_the_file(capsys, tmp_path, source, name, content, needle):
    bad = tmp_path / name
    bad.write_bytes(content)
    line = expect_fault(capsys, tmp_path, 2, needle, *prune_args(source, tmp_path / "o", bad))
    assert str(bad) in line
    expect_fault(capsys, tmp_path, 2, needle, "eval", "--model", source, "--data", bad, "--seqlen", "16")


def test_bad_recipe_bytes_are_one_line(capsys, tmp_path, source, text_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes("ignore: ['é']".encode("latin-1"))
    expect_fault(capsys, tmp_path, 2, "--recipe", *prune_args(source, tmp_path / "o", text_file), "--recipe",
                 recipe)


# ------------------------------------------------------------------------------------------ the place of --out
def test_dangling_symlink_out_is_refused_before_calibration(capsys, tmp_path, source, text_file, monkeypatch):
    import unipruning.jobs as jobs

    os.symlink(tmp_path / "nowhere", tmp_path / "o")
    monkeypatch.setattr(jobs, "calibration_windows", lambda *a, **k: pytest.fail("calibrated first"))
    expect_fault(capsys, tmp_path, 2, "does not exist", *prune_args(source, tmp_path / "o", text_file))
    (tmp_path / "file").write_text("x")
    expect_fault(capsys, tmp_path, 2, "not a directory", *prune_args(source, tmp_path / "file" / "o", text_file))


def test_out_through_a_symlink_to_a_directory_writes_the_target(capsys, tmp_path, source, text_file):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "o")
    assert run(capsys, *prune_args(source, tmp_path / "o", text_file))[0] == 0
    assert os.path.islink(tmp_path / "o") and (tmp_path / "real" / "pruning_report.json").is_file()
    assert not leftovers(tmp_path)


def test_read_only_filesystem_is_one_line_exit_1(capsys, tmp_path, source, text_file):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        for extra in ([], ["--dry-run"]):
            line = expect_fault(capsys, tmp_path / "ro", 1, "Read-only file system",
                                *prune_args(source, ro / "o", text_file), *extra)
            assert str(ro) in line


def test_full_filesystem_leaves_no_partial_keeping_it_full(capsys, tmp_path, source, pruned, text_file):
    with tmpfs(tmp_path / "full", "160k") as full:
        free = os.statvfs(full).f_bavail
        line = expect_fault(capsys, full, 1, "No space left on device", *prune_args(source, full / "o", text_file))
        assert "free space and rerun" in line and os.statvfs(full).f_bavail == free
        expect_fault(capsys, full, 1, "No space left on device", "mask", "--model", source, "--saliency",
                     f"{pruned}/saliency", "--out", full / "o")
        assert os.statvfs(full).f_bavail == free


# ------------------------------------------------------------------------------------------ damaged saliency
def _damaged_saliency(pruned, tmp_path, damage) -> str:
    saliency = shutil.copytree(f"{pruned}/saliency", tmp_path / "sal")
    damage(saliency)
    return str(saliency)


@pytest.mark.parametrize("damage,needle", [
    (lambda d: _truncate(d / "saliency-00001-of-00002.safetensors"), "not a readable saliency shard"),
    (lambda d: (d / "saliency-00002-of-00002.safetensors").unlink(), "missing"),
    (lambda d: (d / "saliency_config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "saliency_config.json").write_text("[]"), "not a JSON object"),
    (lambda d: (d / "saliency.safetensors.index.json").write_text('{"weight_map": 3}'), "no valid weight_map"),
], ids=["truncated-shard", "missing-shard", "config-not-json", "config-not-object", "bad-index"])
def test_damaged_saliency_is_one_line(capsys, tmp_path, source, pruned, damage, needle):
    saliency = _damaged_saliency(pruned, tmp_path, damage)
    expect_fault(capsys, tmp_path, 2, needle, "mask", "--model", source, "--saliency", saliency, "--out",
                 tmp_path / "o")


# ------------------------------------------------------------------------------------------ eval
def test_eval_faults(capsys, tmp_path, source, text_file):
    expect_fault(capsys, tmp_path, 2, "--batch-size", "eval", "--model", source, "--data", text_file, "--seqlen",
                 "16", "--batch-size", "0")
    expect_fault(capsys, tmp_path, 2, "max_position_embeddings 256", "eval", "--model", source, "--data",
                 text_file, "--seqlen", "512")


def test_eval_of_a_model_with_nan_weights_is_valid_json_and_fails(capsys, tmp_path, source, text_file):
    model = copy_model(source, tmp_path)
    edit_weights(model, lambda t: t["model.norm.weight"].fill_(float("nan")))
    code, out, err = run(capsys, "eval", "--model", model, "--data", text_file, "--seqlen", "16", "--json")
    result = json.loads(out.strip().splitlines()[-1])  # strict JSON: NaN would not parse as null
    assert code == 2 and result["perplexity"] is None and "not finite (nan)" in result["error"]
    assert len(err.strip().splitlines()) == 1 and "not finite" in err


# ------------------------------------------------------------------------------------------ wrong results
@pytest.mark.parametrize("where,value", [(BLOCK0, float("nan")), ("model.layers.1.self_attn.q_proj.weight",
                                                                    float("inf")),
                                         ("model.layers.1.input_layernorm.weight", float("nan"))],
                         ids=["nan-prunable", "inf-prunable", "nan-norm"])
def test_non_finite_weights_are_refused_naming_the_matrix(capsys, tmp_path, source, text_file, where, value):
    model = copy_model(source, tmp_path)
    edit_weights(model, lambda t: t[where].view(-1)[3:5].fill_(value))
    line = expect_fault(capsys, tmp_path, 2, where, *prune_args(model, tmp_path / "o", text_file))
    assert "non-finite" in line


def test_mask_refuses_non_finite_weights(capsys, tmp_path, source, pruned):
    from unipruning.io.checkpoint import LazyCheckpoint, load_config

    model = copy_model(source, tmp_path)
    edit_weights(model, lambda t: t[BLOCK0].view(-1)[0].fill_(float("nan")))
    saliency = shutil.copytree(f"{pruned}/saliency", tmp_path / "sal")  # claims the NaN model as its source
    meta = json.loads((saliency / "saliency_config.json").read_text())
    meta["source_sha256"] = LazyCheckpoint(model, load_config(model)).content_sha256()
    (saliency / "saliency_config.json").write_text(json.dumps(meta))
    expect_fault(capsys, tmp_path, 2, BLOCK0, "mask", "--model", model, "--saliency", saliency, "--out",
                 tmp_path / "o")


def test_seqlen_beyond_the_context_is_refused(capsys, tmp_path, source, pruned, text_file):
    expect_fault(capsys, tmp_path, 2, "max_position_embeddings 256", *prune_args(source, tmp_path / "o", text_file),
                 "--seqlen", "300")
    expect_fault(capsys, tmp_path, 2, "max_position_embeddings 256", "mask", "--model", source, "--saliency",
                 f"{pruned}/saliency", "--out", tmp_path / "o", "--reconstruct", "obs", "--calib", text_file,
                 "--seqlen", "300")


def test_dry_run_makes_every_check_of_the_real_run(capsys, tmp_path, source, text_file):
    expect_fault(capsys, tmp_path, 2, "--calib", "prune", "--model", source, "--out", tmp_path / "o", "--calib",
                 tmp_path / "missing.txt", *SMALL, "--dry-run")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    expect_fault(capsys, tmp_path, 2, "not empty", *prune_args(source, full, text_file), "--dry-run")
    expect_fault(capsys, tmp_path, 2, "fewer than nsamples", *prune_args(source, tmp_path / "o", text_file),
                 "--nsamples", "5000", "--seqlen", "200", "--dry-run")


# ------------------------------------------------------------------------------------------ the real command line
@pytest.mark.slow  # budget: 90 s on 2 CPU cores (measured 35-50 s: a reference prune and a killed one, resumed)
def test_real_runs_lock_interrupt_and_resume_with_overwrite(capsys, tmp_path, text_file):
    """Through the installed command: a second run into a busy --out fails naming the first one's PID;
    SIGTERM stops the first with one line saying where its partial state is, the earlier output
    untouched; the same command (with --overwrite) resumes to the bytes of an uninterrupted run."""
    model = make_checkpoint(tmp_path / "model", layers=4, hidden=64, intermediate=128)
    args = ["prune", "--model", model, "--calib", text_file, "--nsamples", "64", "--seqlen", "64"]
    out = tmp_path / "o"
    assert run(capsys, *args, "--out", out, "--sparsity", "0.7")[0] == 0  # an earlier output
    earlier = snapshot(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unipruning", *args, "--out", out, "--overwrite"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline, partial = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and partial is None:
        found = [tmp_path / p for p in os.listdir(tmp_path) if p.startswith(".o.partial-")]
        if found and (found[0] / ".blocks" / "block-00000.safetensors").exists():
            partial = found[0]
        time.sleep(0.02)
    assert partial is not None and proc.poll() is None, "the run ended before a block was done"
    code, _, err = run(capsys, *args, "--out", out, "--overwrite")
    assert code == 2 and f"PID {proc.pid}" in err, err
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and len(stderr.strip().splitlines()) == 1, stderr
    assert "interrupted" in stderr and str(partial) in stderr and "resumes" in stderr, stderr
    assert snapshot(out) == earlier and partial.is_dir() and not (tmp_path / ".o.lock").exists()
    code, _, err = run(capsys, *args, "--out", out, "--overwrite")
    assert code == 0, err
    assert report_of(out)["blocks"][0]["resumed"]
    reference = tmp_path / "reference"
    assert run(capsys, *args, "--out", reference)[0] == 0
    assert output_bytes(out) == output_bytes(reference)
    assert not leftovers(tmp_path), leftovers(tmp_path)


@pytest.mark.slow  # budget: 60 s on 2 CPU cores (measured 20-30 s: three processes start torch and transformers)
def test_real_command_faults_are_one_line(tmp_path, source, text_file):
    """The installed command (not main() in-process): its stderr is one line for a damaged model, a Latin-1
    text and a full disk alike."""
    model = copy_model(source, tmp_path)
    _truncate(os.path.join(model, WEIGHTS))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("Ophélie " * 500).encode("latin-1"))
    cases = [(["prune", "--model", model, "--out", tmp_path / "o", "--calib", text_file, *SMALL], 2, WEIGHTS),
             (["prune", "--model", source, "--out", tmp_path / "o", "--calib", latin, *SMALL], 2, "not UTF-8"),
             (["eval", "--model", source, "--data", latin, "--seqlen", "16"], 2, "not UTF-8")]
    for argv, code, needle in cases:
        done = subprocess.run([sys.executable, "-m", "unipruning", *map(str, argv)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == code and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not leftovers(tmp_path)


def test_tensor_digests_are_cached_by_file_identity(tmp_path, source, monkeypatch):
    """The content hash is read once per file version: a second run reuses it, a rewritten file is read
    again (and a changed tensor changes the digest)."""
    import unipruning.io.identity as identity

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    model = copy_model(source, tmp_path)
    files, calls = [os.path.join(model, WEIGHTS)], []
    real = identity._hash_tensors
    monkeypatch.setattr(identity, "_hash_tensors", lambda path: calls.append(path) or real(path))
    first = identity.content_digest(files)
    assert identity.content_digest(files) == first and len(calls) == 1
    edit_weights(model, lambda t: t[BLOCK0].view(-1)[0].add_(1.0))
    assert identity.content_digest(files) != first and len(calls) == 2
    with safe_open(files[0], framework="pt") as handle:  # the digest covers every tensor of the file
        assert set(identity.tensor_digests(files)) == set(handle.keys())
    assert sorted(os.listdir(model)) == sorted(os.listdir(source))  # the cache is never written beside the model
    assert os.path.isfile(tmp_path / "cache" / identity.CACHE_FILE)


def test_resume_after_the_calibration_text_changed_starts_afresh(capsys, tmp_path, source, text_file, monkeypatch):
    calib = tmp_path / "calib.txt"
    shutil.copy(text_file, calib)
    args = prune_args(source, tmp_path / "o", calib)
    interrupt_after_first_block(monkeypatch)
    assert run(capsys, *args)[0] == 130
    monkeypatch.undo()
    calib.write_text(calib.read_text()[1000:])  # other windows at the same offsets
    assert run(capsys, *args)[0] == 0
    assert not any(b["resumed"] for b in report_of(tmp_path / "o")["blocks"])
    assert not leftovers(tmp_path)


def test_in_memory_prune_refuses_non_finite_weights(source, text_file):
    from transformers import AutoModelForCausalLM

    from unipruning import UsageError, prune

    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(UsageError, match="model.layers.0.mlp.down_proj.weight has 1 non-finite"):
        prune(model, torch.zeros(2, 8, dtype=torch.int64))


def test_sigterm_landing_in_a_finalizer_still_stops_the_run():
    """Python ignores an exception raised in `__del__` (printing a traceback): a SIGTERM delivered there is
    delivered again, silently, so that the run stops with its one line all the same."""
    from unipruning.cli import _sigterm_as_interrupt

    class Slow:
        def __del__(self):
            time.sleep(0.3)  # the signal arrives while the finalizer runs

    unraisable = []
    previous = signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with _sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            slow = Slow()
            del slow
            time.sleep(5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sys.unraisablehook = hook
    assert not unraisable  # nothing printed for the swallowed one


# ------------------------------------------------------------------------------------------ neighbours of the classes
def test_an_empty_out_is_refused_not_taken_for_the_working_directory(capsys, tmp_path, source, pruned, text_file,
                                                                     monkeypatch):
    """`--out ""` is the working directory to os.path.abspath while os.path.exists("") is False: it passed
    every check and the run replaced the working directory (found by deleting a checkout)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "work.py").write_text("mine")
    (cwd / "pruning_report.json").write_text("{}")  # even one that looks like an earlier output
    monkeypatch.chdir(cwd)
    for argv in (prune_args(source, "", text_file), ["pack", "--model", pruned, "--out", ""],
                 ["pack", "--format", "fp8-2:4", "--model", pruned, "--out", ""],
                 ["mask", "--model", source, "--saliency", f"{pruned}/saliency", "--out", ""], ["demo", "--out", ""]):
        expect_fault(capsys, tmp_path, 2, "empty string", *argv, "--overwrite")


def test_out_inside_a_local_copy_of_c4_is_refused(capsys, tmp_path, source):
    copy = tmp_path / "c4"
    (copy / "en").mkdir(parents=True)
    (copy / "en" / "notes.txt").write_text("mine")
    expect_fault(capsys, tmp_path, 2, "--calib", "prune", "--model", source, "--out", copy / "o", "--calib",
                 f"c4:{copy}", *SMALL)


def test_out_holding_the_files_a_model_links_to_is_refused(capsys, tmp_path, pruned, text_file):
    """A model directory of symbolic links (as a hub snapshot is) into an earlier output: --overwrite of that
    output would delete the files the model is read from."""
    earlier = shutil.copytree(pruned, tmp_path / "earlier")
    links = tmp_path / "links"
    links.mkdir()
    for name in os.listdir(earlier):
        os.symlink(earlier / name, links / name)
    line = expect_fault(capsys, tmp_path, 2, "its file", *prune_args(links, earlier, text_file), "--overwrite")
    assert "--model" in line
    expect_fault(capsys, tmp_path, 2, "its file", "pack", "--model", links, "--out", earlier, "--overwrite")


def test_mask_out_equal_to_its_tokenizer_is_refused(capsys, tmp_path, source, pruned, text_file):
    tok = shutil.copytree(source, tmp_path / "tok", ignore=shutil.ignore_patterns("*.safetensors"))
    expect_fault(capsys, tmp_path, 2, "--tokenizer", "mask", "--model", source, "--saliency", f"{pruned}/saliency",
                 "--out", tok, "--reconstruct", "obs", "--calib", text_file, "--tokenizer", tok, *SMALL, "--overwrite")


@pytest.fixture(scope="module")
def pruned24(tmp_path_factory, source, text_file):
    out = tmp_path_factory.mktemp("pruned24") / "p"
    assert main([str(a) for a in prune_args(source, out, text_file, "--pattern", "2:4")]) == 0
    return str(out)


def test_fp8_pack_keeps_inputs_and_says_one_line(capsys, tmp_path, source, pruned24):
    """pack --format fp8-2:4 (a path of its own, packing/fp8.py) under the same guarantees as pack."""
    fp8 = ["pack", "--format", "fp8-2:4"]
    expect_fault(capsys, tmp_path, 2, "--model", *fp8, "--model", pruned24, "--out", os.path.dirname(pruned24),
                 "--overwrite")
    expect_fault(capsys, tmp_path, 2, "--model", *fp8, "--model", pruned24, "--out", f"{pruned24}/x")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    expect_fault(capsys, tmp_path, 2, "not an earlier unipruning output", *fp8, "--model", pruned24, "--out", mine,
                 "--overwrite")
    model = copy_model(pruned24, tmp_path)
    shard = sorted(n for n in os.listdir(model) if n.endswith(".safetensors"))[0]
    _truncate(os.path.join(model, shard))
    expect_fault(capsys, tmp_path, 2, shard, *fp8, "--model", model, "--out", tmp_path / "o")
    out = tmp_path / "fp8"
    for extra in ([], ["--overwrite"]):  # an earlier FP8 output is one that --overwrite may replace
        code, _, err = run(capsys, *fp8, "--model", pruned24, "--out", out, *extra)
        assert code == 0, err
    holder = _hold_lock(tmp_path / ".fp8.lock")
    try:
        code, _, err = run(capsys, *fp8, "--model", pruned24, "--out", out, "--overwrite")
        assert code == 2 and f"PID {holder.pid}" in err and len(err.strip().splitlines()) == 1, err
    finally:
        holder.kill()
        holder.wait()
        os.remove(tmp_path / ".fp8.lock")  # the holder's own, not a run's
    assert not leftovers(tmp_path), leftovers(tmp_path)


@pytest.mark.parametrize("body,needle", [
    ("sparsity_stage: [a, b]\n", "not a mapping of modifier groups"),
    ("sparsity_stage: x\n", "not a mapping of modifier groups"),
    ("sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier: [1]\n", "not a mapping of its arguments"),
    ("sparsity_stage:\n  sparsity_modifiers: [1]\n", "not a mapping of modifiers"),
    ("sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier:\n      sparsity: abc\n", "one number"),
    ("sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier:\n      sparsity: 0.5\n      targets: 5\n",
     "targets"),
    ("sparsity_stage:\n  sparsity_modifiers:\n    WandaPruningModifier:\n      sparsity: 0.5\n"
     "      mask_structure: [2, 4]\n", "N:M"),
    ("sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier:\n      sparsity: 0.5\n      block_size: -3\n",
     "--blocksize"),
    ("sparsity_stage:\n  sparsity_modifiers: {SparseGPTModifier: {sparsity: 0.5}\n", "cannot parse"),
], ids=["stage-list", "stage-string", "modifier-list", "group-list", "sparsity-text", "targets-number",
        "structure-list", "blocksize-negative", "truncated-yaml"])
def test_a_malformed_llm_compressor_recipe_is_one_line(capsys, tmp_path, source, text_file, body, needle):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(body)
    expect_fault(capsys, tmp_path, 2, needle, *prune_args(source, tmp_path / "o", text_file), "--recipe", recipe)


@pytest.mark.parametrize("extra", [["--reconstruct", "obs"], ["--metric", "sparsegpt", "--reconstruct", "obs"],
                                   ["--metric", "magnitude"], ["--allocation", "owl"], ["--feedback", "full"]],
                         ids=["obs", "sparsegpt", "magnitude", "owl", "feedback-full"])
def test_non_finite_weights_are_refused_by_every_method(capsys, tmp_path, source, text_file, extra):
    model = copy_model(source, tmp_path)
    where = "model.layers.1.mlp.up_proj.weight"
    edit_weights(model, lambda t: t[where].view(-1)[7].fill_(float("nan")))
    line = expect_fault(capsys, tmp_path, 2, where, *prune_args(model, tmp_path / "o", text_file), *extra)
    assert "non-finite" in line


def test_a_zero_byte_reconstruction_state_is_reconstructed_again(capsys, tmp_path, source, text_file, monkeypatch):
    import unipruning.pipeline.reconstruct as recon

    real = recon._Reconstruction._reconstruct

    def stop_at_block_1(self, index, *rest):
        if index == 1:
            raise KeyboardInterrupt
        return real(self, index, *rest)

    args = prune_args(source, tmp_path / "o", text_file, "--reconstruct", "obs")
    monkeypatch.setattr(recon._Reconstruction, "_reconstruct", stop_at_block_1)
    assert run(capsys, *args)[0] == 130
    monkeypatch.undo()
    (partial,) = [p for p in os.listdir(tmp_path) if ".partial-" in p]
    state = tmp_path / partial / ".recon" / "block-00000.safetensors"
    assert state.is_file()
    state.write_bytes(b"")  # what a crash before the disk was flushed leaves
    code, _, err = run(capsys, *args)
    assert code == 0, err
    reference = tmp_path / "reference"
    assert run(capsys, *prune_args(source, reference, text_file, "--reconstruct", "obs"))[0] == 0
    assert output_bytes(tmp_path / "o") == output_bytes(reference)
    assert not leftovers(tmp_path), leftovers(tmp_path)


def test_perplexity_keeps_nan_and_overflows_to_inf():
    from unipruning.evaluate import perplexity

    class Logits(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, input_ids, use_cache=False):
            logits = torch.zeros(*input_ids.shape, 4)
            logits[..., 0] = self.value
            return type("Out", (), {"logits": logits})()

    windows = torch.ones(2, 5, dtype=torch.int64)
    assert math.isnan(perplexity(Logits(float("nan")), windows, torch.device("cpu")))
    assert perplexity(Logits(1e6), windows, torch.device("cpu")) == math.inf
    assert perplexity(Logits(0.0), windows, torch.device("cpu")) == pytest.approx(4.0)


def test_a_full_filesystem_under_pack_leaves_nothing(capsys, tmp_path, pruned24):
    with tmpfs(tmp_path / "full", "48k") as full:
        free = os.statvfs(full).f_bavail
        for fmt in (["--dtype", "bfloat16"], ["--format", "fp8-2:4"]):
            line = expect_fault(capsys, full, 1, "No space left on device", "pack", "--model", pruned24, "--out",
                                full / "o", *fmt)
            assert "free space and rerun" in line and os.statvfs(full).f_bavail == free


# ------------------------------------------------------------------------------------------ issue 25: nothing lost
def _user_dir(path, content: str) -> None:
    path.mkdir()
    (path / "mine.txt").write_text(content)


def test_directories_named_like_partial_state_are_never_taken_for_ours(capsys, tmp_path, source, pruned, text_file):
    """The stale-state cleanup removed `.NAME.old-XXXXXXXX` / `.NAME.partial-XXXXXXXX` by their names alone:
    only a directory holding a run's marker is ours; the user's survive every successful run, byte for byte."""
    for name in (".o.old-20261201", ".o.partial-abcdefgh", ".o.partial-0123456789abcdef", ".o.old-output"):
        _user_dir(tmp_path / name, name)
    mine = snapshot(tmp_path)
    assert run(capsys, *prune_args(source, tmp_path / "o", text_file))[0] == 0
    saliency = shutil.copytree(f"{pruned}/saliency", tmp_path / "sal")
    code, _, err = run(capsys, "mask", "--model", source, "--saliency", saliency, "--out", tmp_path / "o",
                       "--overwrite", "--sparsity", "0.6")  # moves the earlier output aside, then removes it
    assert code == 0 and "removed stale" not in err, err
    after = snapshot(tmp_path)
    assert {p: after.get(p) for p in mine} == mine
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".o.")) == sorted(
        os.path.basename(os.path.dirname(p)) for p in mine if "/.o." in p)


def test_a_user_directory_or_file_where_a_run_stages_or_locks_is_refused(capsys, tmp_path, source, pruned,
                                                                         text_file, monkeypatch):
    mask = ["mask", "--model", source, "--saliency", f"{pruned}/saliency", "--out", tmp_path / "o"]
    _user_dir(tmp_path / ".o.partial-staged", "not a run's")
    start = time.perf_counter()
    expect_fault(capsys, tmp_path, 2, "no unipruning run made it", *mask)
    assert time.perf_counter() - start < 30
    shutil.rmtree(tmp_path / ".o.partial-staged")
    (tmp_path / ".o.lock").write_text("my notes on o\n")  # a lock file holds a PID, and nothing else
    expect_fault(capsys, tmp_path, 2, "not a unipruning lock file", *mask)
    os.remove(tmp_path / ".o.lock")
    os.symlink(tmp_path / "elsewhere", tmp_path / ".o.lock")
    expect_fault(capsys, tmp_path, 2, "not a unipruning lock file", *mask)
    os.remove(tmp_path / ".o.lock")
    args = prune_args(source, tmp_path / "p", text_file)  # a resumable run's directory, its marker gone
    interrupt_after_first_block(monkeypatch)
    assert run(capsys, *args)[0] == 130
    monkeypatch.undo()
    (partial,) = [tmp_path / p for p in os.listdir(tmp_path) if p.startswith(".p.partial-")]
    os.remove(partial / staging.MARKER)
    expect_fault(capsys, tmp_path, 2, "no unipruning run made it", *args)
    assert partial.is_dir()


def test_a_failed_final_rename_leaves_no_unmentioned_staging(capsys, tmp_path, source, pruned, text_file,
                                                            monkeypatch):
    """A rename into place that fails (EBUSY: a mount point found too late, EXDEV...): the earlier output is
    put back, a staged directory removed, a resumable one kept and named in the one line."""
    real = os.rename

    def busy(src, dst):
        if os.path.basename(str(dst)) == "o" and ".partial-" in os.path.basename(str(src)):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(dst))
        return real(src, dst)

    earlier = shutil.copytree(pruned, tmp_path / "o")
    before = snapshot(earlier)
    monkeypatch.setattr(staging.os, "rename", busy)
    code, _, err = run(capsys, "mask", "--model", source, "--saliency", f"{pruned}/saliency", "--out", earlier,
                       "--overwrite")
    assert code == 1 and "Device or resource busy" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(earlier) == before and not leftovers(tmp_path), leftovers(tmp_path)
    code, _, err = run(capsys, *prune_args(source, earlier, text_file), "--overwrite")
    monkeypatch.undo()
    (partial,) = [p for p in leftovers(tmp_path) if ".partial-" in p]
    assert code == 1 and partial in err and "resumes" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(earlier) == before
    assert run(capsys, *prune_args(source, earlier, text_file), "--overwrite")[0] == 0  # and it does
    assert not leftovers(tmp_path), leftovers(tmp_path)


def test_a_link_deep_inside_an_input_directory_into_out_is_refused(capsys, tmp_path, source, pruned, text_file):
    """--calib texts where texts/sub/part.txt links into --out: replacing --out would delete what the run
    reads; every entry of an input directory counts, at any depth, files and directories alike."""
    earlier = shutil.copytree(pruned, tmp_path / "prev2")
    (earlier / "extra").mkdir()
    shutil.copy(text_file, earlier / "extra" / "part.txt")
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    shutil.copy(text_file, texts / "a.txt")
    os.symlink(earlier / "extra" / "part.txt", texts / "sub" / "part.txt")
    line = expect_fault(capsys, tmp_path, 2, "--calib", *prune_args(source, earlier, texts), "--overwrite")
    assert "part.txt" in line
    os.remove(texts / "sub" / "part.txt")
    os.symlink(earlier / "extra", texts / "sub" / "linked")  # a directory link, one level down
    expect_fault(capsys, tmp_path, 2, "--calib", *prune_args(source, earlier, texts), "--overwrite")


@contextlib.contextmanager
def bind_mount(source_dir, target):
    """`mount --bind source_dir target` (root only; the test skips where mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    os.makedirs(target, exist_ok=True)
    done = subprocess.run(["mount", "--bind", str(source_dir), str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_out_that_is_a_mount_point_or_an_alias_of_an_input_is_refused_before_any_work(capsys, tmp_path, source,
                                                                                       pruned, text_file):
    """Inputs and --out compared by (st_dev, st_ino), not by path; a mount point refused at once (the run
    used to complete, fail to rename, and leave its staging directory on the parent filesystem)."""
    texts = tmp_path / "texts"
    texts.mkdir()
    shutil.copy(text_file, texts / "a.txt")
    with bind_mount(texts, tmp_path / "alias") as alias:
        expect_fault(capsys, tmp_path / "texts", 2, "--calib", *prune_args(source, alias, texts), "--overwrite")
        expect_fault(capsys, tmp_path / "texts", 2, "--calib", *prune_args(source, alias / "o", texts))
    earlier = shutil.copytree(pruned, tmp_path / "earlier")
    (earlier / "extra").mkdir()
    shutil.copy(text_file, earlier / "extra" / "b.txt")
    with bind_mount(earlier / "extra", texts / "mounted"):  # a mount inside an input reaches into --out
        expect_fault(capsys, earlier, 2, "--calib", *prune_args(source, earlier, texts), "--overwrite")
    with tmpfs(tmp_path / "volume", "4m") as volume:
        for argv in (prune_args(source, volume, text_file), ["pack", "--model", pruned, "--out", volume],
                     ["mask", "--model", source, "--saliency", f"{pruned}/saliency", "--out", volume]):
            start = time.perf_counter()
            expect_fault(capsys, tmp_path, 2, "is a mount point", *argv)
            assert time.perf_counter() - start < 30
        (volume / "keep.txt").write_text("on the volume")
        code, _, err = run(capsys, *prune_args(source, volume / "pruned", text_file))  # inside it: fine
        assert code == 0 and (volume / "keep.txt").read_text() == "on the volume", err


# ------------------------------------------------------------------------------------------ issue 25: bounded
def test_a_config_with_a_million_blocks_is_refused_before_anything_is_built(capsys, tmp_path, source, pruned,
                                                                           text_file):
    model = copy_model(source, tmp_path)
    edit_config(model, num_hidden_layers=1_000_000)
    for argv in (prune_args(model, tmp_path / "o", text_file), [*prune_args(model, tmp_path / "o", text_file),
                 "--dry-run"], ["mask", "--model", model, "--saliency", f"{pruned}/saliency", "--out", tmp_path / "o"],
                 ["eval", "--model", model, "--data", text_file, "--seqlen", "16"],
                 ["pack", "--model", model, "--out", tmp_path / "o"]):
        start = time.perf_counter()
        expect_fault(capsys, tmp_path, 2, "num_hidden_layers 1000000", *argv)
        assert time.perf_counter() - start < 30
    edit_config(model, num_hidden_layers="2")
    expect_fault(capsys, tmp_path, 2, "num_hidden_layers", *prune_args(model, tmp_path / "o", text_file))


def test_expert_counts_beyond_the_weights_are_refused():
    from types import SimpleNamespace

    from unipruning.errors import UsageError
    from unipruning.io.checkpoint import check_counts

    held = {f"model.layers.{b}.mlp.experts.{e}.up_proj.weight": [8, 4] for b in range(2) for e in range(4)}
    check_counts(SimpleNamespace(model_type="qwen2_moe", num_hidden_layers=2, num_experts=4), held)
    for config in (SimpleNamespace(model_type="qwen2_moe", num_hidden_layers=2, num_experts=10**6),
                   SimpleNamespace(model_type="mixtral", num_hidden_layers=2, num_local_experts=5)):
        with pytest.raises(UsageError, match="the weights hold 4 experts"):
            check_counts(config, held)
    fused = {"model.layers.0.mlp.experts.gate_up_proj": [6, 8, 4]}  # experts stored as one 3-D tensor
    check_counts(SimpleNamespace(model_type="qwen2_moe", num_hidden_layers=1, num_experts=6), fused)


def _anchor_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines).replace("a0: &a0", "targets: &a0", 1) + f"\ndense_layers: [*a{levels - 1}]\n"


@pytest.mark.parametrize("body,needle", [
    (_anchor_bomb(), "aliases expand"),
    ("dense_layers: &d [0, *d]\n", "aliases expand"),
    ("ignore: ['" + "x" * (1 << 20) + "']\n", "more than a file of its kind"),
    ("targets: mlp\n", "expected a list of regular expressions"),
    ("overrides: 5\n", "overrides must be a list"),
    ("dense_layers: {a: 1}\n", "block indices"),
], ids=["anchor-bomb", "self-reference", "over-1MiB", "targets-string", "overrides-number", "layers-mapping"])
def test_a_recipe_that_would_exhaust_memory_or_mislead_is_one_line(capsys, tmp_path, source, text_file, body, needle):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(body)
    start = time.perf_counter()
    expect_fault(capsys, tmp_path, 2, needle, *prune_args(source, tmp_path / "o", text_file), "--recipe", recipe)
    assert time.perf_counter() - start < 30


def test_a_catastrophic_regular_expression_is_one_line_in_bounded_time(capsys, tmp_path, source, text_file):
    """`(.+)+Z` backtracked for minutes in `re` and ignored Ctrl-C: the patterns are matched in a child
    process killed after patterns.MATCH_SECONDS."""
    from unipruning.patterns import MATCH_SECONDS

    start = time.perf_counter()
    line = expect_fault(capsys, tmp_path, 2, "takes more than", *prune_args(source, tmp_path / "o", text_file),
                        "--ignore", "mlp", "(.+)+Z")
    assert "--ignore" in line and "(.+)+Z" in line and time.perf_counter() - start < MATCH_SECONDS + 25


@pytest.mark.parametrize("pattern", ["(.+)+Z", ".*.*.*.*.*.*.*.*.*.*Z", "([\\w.]+)+!"])
def test_catastrophic_patterns_are_stopped_and_named(pattern, monkeypatch):
    import unipruning.patterns as patterns
    from unipruning.errors import UsageError

    monkeypatch.setattr(patterns, "MATCH_SECONDS", 1.0)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(30)]
    start = time.perf_counter()
    with pytest.raises(UsageError, match=r"`ignore`: .* takes more than 1 s"):
        patterns.Matches({(patterns.SEARCH, "mlp", re.compile("mlp").flags): "`targets`",
                          (patterns.SEARCH, pattern, re.compile(pattern).flags): "`ignore`"}, names)
    assert time.perf_counter() - start < 10


def test_ctrl_c_stops_a_catastrophic_match_at_once(monkeypatch):
    import threading

    import unipruning.patterns as patterns

    monkeypatch.setattr(patterns, "MATCH_SECONDS", 120.0)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(30)]
    children = []
    real = subprocess.Popen
    monkeypatch.setattr(patterns.subprocess, "Popen", lambda *a, **k: children.append(real(*a, **k)) or children[-1])
    # Python's own Ctrl-C handler, unblocked, as in a `unipruning` process (the package installs no SIGINT
    # handler): in the whole suite, after other tests, the signal once raised nothing for 120 s
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            patterns.Matches({(patterns.SEARCH, "(.+)+Z", re.compile("(.+)+Z").flags): "`targets`"}, names)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - start < 10 and children[0].poll() is not None  # the child is gone too


def test_matching_keeps_the_results_of_re(tmp_path):
    import unipruning.patterns as patterns

    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "Mlp"]
    cases = [(patterns.SEARCH, "mlp\\.", 0), (patterns.SEARCH, "(?i)^mlp", 0), (patterns.MATCH, "layers", 0),
             (patterns.MATCH, "model\\.layers\\.1", 0), (patterns.SEARCH, "MLP", re.IGNORECASE)]
    found = patterns.Matches({(how, text, re.compile(text, flags).flags): "`targets`" for how, text, flags in cases},
                             names)
    for how, text, flags in cases:
        regex = re.compile(text, flags)
        expected = {n for n in names if getattr(regex, how)(n)}
        assert {n for n in names if found(how, text, regex.flags, n)} == expected


def test_a_fifo_or_device_in_a_calibration_directory_is_skipped_and_named(capsys, caplog, tmp_path, source,
                                                                          text_file):
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    shutil.copy(text_file, texts / "a.txt")
    os.mkfifo(texts / "sub" / "pipe.txt")
    os.symlink("/dev/zero", texts / "zero.txt")
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="unipruning"):
        code, out, err = run(capsys, *prune_args(source, tmp_path / "o", texts), "--dry-run")
    assert code == 0 and "dry run" in out, err
    assert "skipped 2" in caplog.text and "pipe.txt" in caplog.text and "zero.txt" in caplog.text
    assert time.perf_counter() - start < 30
    expect_fault(capsys, tmp_path, 2, "not a regular file", *prune_args(source, tmp_path / "o",
                                                                       texts / "sub" / "pipe.txt"))
    model = copy_model(source, tmp_path)
    os.remove(os.path.join(model, "tokenizer.json"))
    os.mkfifo(os.path.join(model, "tokenizer.json"))  # transformers would open it and wait
    for argv in (prune_args(model, tmp_path / "o", text_file), ["eval", "--model", model, "--data", text_file,
                                                                  "--seqlen", "16"]):
        start = time.perf_counter()
        expect_fault(capsys, tmp_path, 2, "tokenizer.json is not a regular file", *argv)
        assert time.perf_counter() - start < 30


def test_text_of_nothing_but_whitespace_or_far_too_large_is_refused(capsys, tmp_path, source, text_file):
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n" * 300_000)
    expect_fault(capsys, tmp_path, 2, "only whitespace", *prune_args(source, tmp_path / "o", blank))
    expect_fault(capsys, tmp_path, 2, "only whitespace", "eval", "--model", source, "--data", blank, "--seqlen", "16")
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(300 << 20)  # sparse: no disk, no read
    start = time.perf_counter()
    expect_fault(capsys, tmp_path, 2, "MiB of text", *prune_args(source, tmp_path / "o", huge))
    assert time.perf_counter() - start < 30


def test_an_ignore_pattern_that_matches_nothing_is_refused(capsys, tmp_path, source, text_file):
    expect_fault(capsys, tmp_path, 2, "--ignore: 'mpl' matches no prunable matrix",
                 *prune_args(source, tmp_path / "o", text_file), "--ignore", "mlp\\.", "mpl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("overrides:\n  - {match: 'mlp\\.experts', pattern: '2:4'}\n")
    expect_fault(capsys, tmp_path, 2, "matches no prunable matrix", *prune_args(source, tmp_path / "o", text_file),
                 "--recipe", recipe)


def test_the_lock_is_taken_before_anything_is_loaded(capsys, tmp_path, source, pruned, text_file, monkeypatch):
    import unipruning.io.checkpoint as checkpoint
    import unipruning.jobs as jobs
    import unipruning.packing.assemble as assemble

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the lock was looked at")

    for module in (checkpoint, jobs, assemble):
        monkeypatch.setattr(module, "load_config", loaded)
    holder = _hold_lock(tmp_path / ".o.lock")
    try:
        for argv in (prune_args(source, tmp_path / "o", text_file), ["pack", "--model", pruned, "--out",
                                                                      tmp_path / "o"]):
            start = time.perf_counter()
            line = expect_fault(capsys, tmp_path, 2, f"PID {holder.pid}", *argv)
            assert "being written by another unipruning run" in line and time.perf_counter() - start < 30
    finally:
        holder.kill()
        holder.wait()
        os.remove(tmp_path / ".o.lock")


# ------------------------------------------------------------------------------------------ issue 25: wrong results
@pytest.mark.parametrize("dtype,where", [(torch.int64, "model.layers.1.mlp.up_proj.weight"),
                                         (torch.float8_e4m3fn, "model.layers.1.mlp.up_proj.weight"),
                                         (torch.int32, "model.layers.1.post_attention_layernorm.weight")],
                         ids=["I64-matrix", "F8-matrix", "I32-norm"])
def test_every_tensor_the_model_is_built_from_is_checked_for_its_dtype(capsys, tmp_path, source, pruned, text_file,
                                                                       dtype, where):
    model = copy_model(source, tmp_path)
    edit_weights(model, lambda t: t.__setitem__(where, t[where].to(dtype)))
    for argv in (prune_args(model, tmp_path / "o", text_file), ["mask", "--model", model, "--saliency",
                 f"{pruned}/saliency", "--out", tmp_path / "o"], ["pack", "--model", model, "--out", tmp_path / "o"],
                 ["eval", "--model", model, "--data", text_file, "--seqlen", "16"]):
        expect_fault(capsys, tmp_path, 2, f"{where} is stored as", *argv)


def test_settings_that_make_the_saliency_diverge_are_refused(capsys, tmp_path, source, pruned, text_file):
    for kappa in ("1e308", "2.5", "nan", "inf", "0"):
        expect_fault(capsys, tmp_path, 2, "--kappa", *prune_args(source, tmp_path / "o", text_file), "--kappa", kappa)
    saliency = shutil.copytree(f"{pruned}/saliency", tmp_path / "sal")
    shard = sorted(p for p in os.listdir(saliency) if p.endswith(".safetensors"))[-1]
    tensors = load_file(saliency / shard)
    name = next(k for k in tensors if k.endswith(".z"))
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, saliency / shard, metadata={"format": "pt"})
    line = expect_fault(capsys, tmp_path, 2, "non-finite", "mask", "--model", source, "--saliency", saliency, "--out",
                        tmp_path / "o")
    assert name[:-2] in line


def test_a_non_finite_saliency_met_mid_run_is_refused_and_not_kept(capsys, tmp_path, source, text_file,
                                                                    monkeypatch):
    """A block's z that is not finite (here: its saved state, damaged between two runs) is refused when its
    masks are cut, naming the matrix, and the partial state, which would fail again, is removed."""
    args = prune_args(source, tmp_path / "o", text_file)
    interrupt_after_first_block(monkeypatch)
    assert run(capsys, *args)[0] == 130
    monkeypatch.undo()
    (partial,) = [tmp_path / p for p in os.listdir(tmp_path) if ".partial-" in p]
    state = partial / ".blocks" / "block-00000.safetensors"
    with safe_open(state, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(state)
    tensors[f"{BLOCK0}.z"].view(-1)[5] = float("inf")
    save_file(tensors, state, metadata=metadata)
    before = set(os.listdir(tmp_path)) - {partial.name}
    code, _, err = run(capsys, *args)
    assert code == 2 and BLOCK0 in err and "non-finite" in err and len(err.strip().splitlines()) == 1, err
    assert set(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("extra", [[], ["--reconstruct", "obs", "--calib", "TEXT"]], ids=["prune", "mask-obs"])
def test_a_seed_beyond_64_bits_names_the_option(capsys, tmp_path, source, pruned, text_file, extra):
    seed = str(2**64)
    if extra:
        argv = ["mask", "--model", source, "--saliency", f"{pruned}/saliency", "--out", tmp_path / "o", *SMALL,
                *[text_file if e == "TEXT" else e for e in extra]]
    else:
        argv = prune_args(source, tmp_path / "o", text_file)
    expect_fault(capsys, tmp_path, 2, "--seed", *argv, "--seed", seed)
    expect_fault(capsys, tmp_path, 2, "--seed", *argv, "--seed", "-1")


@contextlib.contextmanager
def unreadable(path):
    """`path` unreadable to this process: mode 000, and, as root (who reads anything), an effective uid of
    nobody for the duration, in a directory chain nobody may traverse."""
    mode = os.stat(path).st_mode
    os.chmod(path, 0)
    try:
        if os.geteuid() != 0:
            yield
            return
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)
    finally:
        os.chmod(path, mode)


def test_an_unreadable_file_says_permission_denied(tmp_path, source, pruned):
    """The OSError's own reason, not "No such file or directory", for weights, config and saliency."""
    import tempfile

    from unipruning.errors import UsageError
    from unipruning.io.checkpoint import load_config, shard_headers
    from unipruning.io.saliency import Saliency

    root = tempfile.mkdtemp(prefix="unipruning-perm-")  # world-traversable, unlike pytest's tmp_path
    try:
        os.chmod(root, 0o755)
        model = shutil.copytree(source, os.path.join(root, "model"))
        saliency = shutil.copytree(f"{pruned}/saliency", os.path.join(root, "saliency"))
        for directory in (model, saliency):
            os.chmod(directory, 0o755)
            for name in os.listdir(directory):
                os.chmod(os.path.join(directory, name), 0o644)
        with unreadable(os.path.join(model, WEIGHTS)), pytest.raises(UsageError, match="Permission denied"):
            shard_headers(model)
        with unreadable(os.path.join(model, "config.json")), pytest.raises(UsageError, match="Permission denied"):
            load_config(model)
        with unreadable(model), pytest.raises(UsageError, match="Permission denied"):
            load_config(model)
        shard = sorted(n for n in os.listdir(saliency) if n.endswith(".safetensors"))[0]
        with unreadable(os.path.join(saliency, shard)), pytest.raises(UsageError, match="Permission denied"):
            Saliency.load(saliency)
    finally:
        shutil.rmtree(root)


# ------------------------------------------------------------------------------------------ issue 25: the Python API
@pytest.fixture(scope="module")
def tiny_model(source):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


def test_apply_masks_checks_every_mask_before_touching_any_weight(tiny_model):
    from unipruning import UsageError, apply_masks
    from unipruning.models import model_matrices, weight_of

    views = {m.name: weight_of(tiny_model, m) for m in model_matrices(tiny_model)}
    before = {name: w.detach().clone() for name, w in views.items()}
    good = {name: torch.rand(w.shape) > 0.5 for name, w in views.items()}
    last = list(good)[-1]
    cases = [({**good, last: good[last][:, :-1]}, "has shape"), ({**good, last: good[last].float()}, "bool tensor"),
             ({**good, "model.layers.9.mlp.up_proj.weight": good[last]}, "does not have"), (list(good), "`masks`")]
    for masks, needle in cases:
        with pytest.raises(UsageError, match=needle):
            apply_masks(tiny_model, masks)
        assert all(torch.equal(views[n], before[n]) for n in views), "a weight changed before the mask was refused"


def _api_cases(source, pruned, pruned24, tmp_path):
    from unipruning import (
        Calibration,
        EvalOptions,
        MaskConfig,
        MaskSpec,
        PruneConfig,
        RunOptions,
        Targeting,
        evaluate_checkpoint,
        mask_checkpoint,
        pack_checkpoint,
        prune_checkpoint,
    )

    out = tmp_path / "o"
    return [
        (lambda: RunOptions(overwrite="no"), "`overwrite`"), (lambda: RunOptions(dry_run=1), "`dry_run`"),
        (lambda: RunOptions(progress="yes"), "`progress`"), (lambda: PruneConfig(seed=2**64), "`seed`"),
        (lambda: PruneConfig(kappa=True), "`kappa`"), (lambda: PruneConfig(mask="2:4"), "`mask`"),
        (lambda: MaskSpec(bounds=(0.1,)), "`bounds`"), (lambda: MaskSpec(pattern=("2", "4")), "`pattern`"),
        (lambda: MaskSpec(sparsity="0.5"), "`sparsity`"), (lambda: MaskSpec(owl_m=float("inf")), "`owl_m`"),
        (lambda: MaskConfig(true_sequential="no"), "`true_sequential`"), (lambda: Calibration(calib=None), "`calib`"),
        (lambda: Calibration(seqlen=2**40), "`seqlen`"), (lambda: Targeting(targets="mlp"), "`targets`"),
        (lambda: mask_checkpoint(source, f"{pruned}/saliency", out, "2:4"), "`config`"),
        (lambda: MaskConfig(mask="2:4"), "`mask`"),
        (lambda: mask_checkpoint(source, f"{pruned}/saliency", out, MaskConfig(), run=RunOptions), "`run`"),
        (lambda: prune_checkpoint(source, out, MaskSpec()), "`config`"),
        (lambda: prune_checkpoint(source, None, PruneConfig()), "`out`"),
        (lambda: pack_checkpoint(pruned24, out, overwrite="no"), "`overwrite`"),
        (lambda: EvalOptions(trust_remote_code="no"), "`trust_remote_code`"),
        (lambda: evaluate_checkpoint(source, "wikitext2", 16, "cpu"), "`options`"),
    ]


def test_the_option_objects_and_jobs_check_types_and_name_the_parameter(tmp_path, source, pruned, pruned24):
    from unipruning import UsageError

    for make, needle in _api_cases(source, pruned, pruned24, tmp_path):
        with pytest.raises(UsageError) as caught:
            make()
        assert needle in str(caught.value), (needle, str(caught.value))
    assert not os.listdir(tmp_path)


def test_the_in_memory_functions_check_their_tensors(tiny_model, source, text_file):
    from transformers import AutoModelForCausalLM

    from unipruning import MaskSpec, UsageError, compute_masks, prune
    from unipruning.evaluate import perplexity

    vocab = tiny_model.config.vocab_size
    with pytest.raises(UsageError, match="`calibration_batches`: token ids must lie in"):
        prune(tiny_model, torch.full((2, 8), vocab, dtype=torch.int64))
    with pytest.raises(UsageError, match="`calibration_batches`: token ids must lie in"):
        prune(tiny_model, torch.full((2, 8), -1, dtype=torch.int64))
    with pytest.raises(UsageError, match="`windows`: token ids must lie in"):
        perplexity(tiny_model, torch.full((1, 8), vocab + 3, dtype=torch.int64), torch.device("cpu"))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_model.config)
    with pytest.raises(UsageError, match="meta device"):
        prune(meta, torch.zeros(2, 8, dtype=torch.int64))
    quantized = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    layer = quantized.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.to(torch.int8), requires_grad=False)
    with pytest.raises(UsageError, match="`model`: model.layers.0.self_attn.q_proj.weight is torch.int8"):
        prune(quantized, torch.zeros(2, 8, dtype=torch.int64))
    weights = {"w": torch.randn(8, 16)}
    for z, needle in (({"w": torch.randn(8, 8)}, "`z`: w has shape"), ({"w": torch.ones(8, 16, dtype=torch.int8)},
                      "torch.int8"), ({"w": torch.full((8, 16), float("nan"))}, "non-finite"),
                      ({"v": torch.randn(8, 16)}, "`weights` lacks 'v'")):
        with pytest.raises(UsageError, match=needle):
            compute_masks(z, weights, MaskSpec())
    with pytest.raises(UsageError, match="`spec`"):
        compute_masks({"w": torch.randn(8, 16)}, weights, "0.5")
