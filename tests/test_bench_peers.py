"""benchmarks/bench_peers.py and its helpers, without the real model: argument parsing, the per-method
result files and resuming, the peak-RSS wrapper (the child's own VmHWM), the realised-sparsity check,
and the text splits (disjoint by document). The llm-compressor runner's modifiers are checked only when
llmcompressor is installed."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "peers"))

import bench_peers  # noqa: E402
import texts  # noqa: E402
import vmhwm  # noqa: E402

MiB = 1 << 20


# --- arguments -------------------------------------------------------------------------------------

def test_defaults_and_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path))
    args = bench_peers.parse_args([])
    assert (args.nsamples, args.seqlen, args.sparsity, args.pattern) == (64, 512, 0.5, "unstructured")
    assert args.methods == list(bench_peers.METHODS) and args.work == str(tmp_path / "bench-peers")
    quick = bench_peers.parse_args(["--quick", "--methods", "dense", "llmc-wanda"])
    assert (quick.nsamples, quick.seqlen, quick.layers, quick.eval_windows) == (4, 64, 2, 4)
    assert quick.methods == ["dense", "llmc-wanda"] and quick.work == str(tmp_path / "bench-peers-quick")


@pytest.mark.parametrize("argv, option", [
    (["--sparsity", "1.5"], "--sparsity"), (["--sparsity", "half"], "--sparsity"),
    (["--pattern", "4:2"], "--pattern"), (["--nsamples", "0"], "--nsamples"),
    (["--methods", "magic"], "--methods"), (["--model", "/nonexistent/model"], "--model"),
])
def test_bad_input_is_one_line_and_exit_2(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_peers.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and option in err and "Traceback" not in err


def _ctx(tmp_path):
    return {"model": str(tmp_path / "model"), "model_sha256": "m" * 64, "calib": str(tmp_path / "calib"),
            "windows": {"path": str(tmp_path / "w.pt"), "sha256": "w" * 64},
            "eval": {"shakespeare": {"sha256": "e" * 64}}, "texts": {}}


def test_commands_feed_the_same_windows(tmp_path):
    args = bench_peers.parse_args(["--nsamples", "16", "--pattern", "2:4", "--work", str(tmp_path)])
    ctx = _ctx(tmp_path)
    ours = bench_peers.command("unipruning-wanda", args, ctx, "OUT")
    assert ours[:3] == ["-m", "unipruning", "prune"] and "--allocation" not in ours  # N:M is per group
    assert ours[ours.index("--batch-size") + 1] == "16" and ours[ours.index("--calib") + 1] == ctx["calib"]
    assert ours[ours.index("--pattern") + 1] == "2:4" and "--sparsity" not in ours
    peer = bench_peers.command("llmc-sparsegpt", args, ctx, "OUT")
    assert peer[0] == bench_peers.LLMC_RUNNER and peer[peer.index("--windows") + 1] == ctx["windows"]["path"]
    assert peer[peer.index("--method") + 1] == "sparsegpt"


# --- result files and resuming ---------------------------------------------------------------------

def _fake_run(calls, fail=()):
    def run(method, args, ctx):
        calls.append(method)
        if method in fail:
            raise RuntimeError(f"{method} killed")
        record = {"method": method, "perplexity": {"shakespeare": 10.0 + len(calls)},
                  "realised_sparsity": {"total": 0.0 if method == "dense" else args.sparsity}}
        if method != "dense":
            record.update(sparsity=args.sparsity, pattern=args.pattern, nsamples=args.nsamples, seqlen=args.seqlen,
                          wall_seconds=1.0, peak_rss_bytes=MiB)
        return record
    return run


def test_a_stopped_run_keeps_finished_methods_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_peers, "prepare", lambda args: _ctx(tmp_path))
    monkeypatch.setattr(bench_peers, "device_name", lambda: ("cpu", "test cpu"))
    out = tmp_path / "peers.json"
    argv = ["--work", str(tmp_path / "work"), "--out", str(out), "--methods", "dense", "llmc-wanda", "unipruning-ria"]
    calls = []
    monkeypatch.setattr(bench_peers, "run_method", _fake_run(calls, fail={"unipruning-ria"}))
    with pytest.raises(RuntimeError, match="unipruning-ria killed"):
        bench_peers.main(argv)
    assert calls == ["dense", "llmc-wanda", "unipruning-ria"]
    with open(out) as f:  # the summary is rewritten after every method
        assert [r["method"] for r in json.load(f)["results"]] == ["dense", "llmc-wanda"]

    calls.clear()
    monkeypatch.setattr(bench_peers, "run_method", _fake_run(calls))
    bench_peers.main(argv)
    assert calls == ["unipruning-ria"]  # the finished methods are not run again
    with open(out) as f:
        result = json.load(f)
    assert sorted(r["method"] for r in result["results"]) == ["dense", "llmc-wanda", "unipruning-ria"]
    assert result["device"] == "test cpu" and "llmcompressor" in result["versions"]
    assert "| unipruning-ria | 0.5 | 64x512 |" in capsys.readouterr().out

    calls.clear()
    bench_peers.main([*argv, "--sparsity", "0.6"])  # another setting: new runs, the dense one is kept
    assert calls == ["llmc-wanda", "unipruning-ria"]
    assert len(os.listdir(tmp_path / "work" / "runs")) == 5


def test_run_key_follows_what_a_result_depends_on(tmp_path):
    args = bench_peers.parse_args(["--work", str(tmp_path)])
    ctx = _ctx(tmp_path)
    key = bench_peers.run_key("llmc-wanda", args, ctx)
    other = {**ctx, "windows": {**ctx["windows"], "sha256": "x" * 64}}
    assert bench_peers.run_key("llmc-wanda", args, other) != key
    assert bench_peers.run_key("dense", args, other) == bench_peers.run_key("dense", args, ctx)
    assert bench_peers.run_key("llmc-sparsegpt", args, ctx) != key


# --- peak RSS of the child itself ------------------------------------------------------------------

def _script(tmp_path, body: str) -> str:
    path = tmp_path / "target.py"
    path.write_text(body)
    return str(path)


def test_wrapper_reports_the_childs_own_peak_not_the_parents(tmp_path):
    ballast = b"\x01" * (400 * MiB)  # written pages: this process's RSS is over 400 MiB at the fork
    assert vmhwm.proc_status_bytes("VmHWM") > 400 * MiB
    target = _script(tmp_path, "import sys\nblock = b'\\x02' * (64 << 20)\nsys.exit(3)\n")
    report = tmp_path / "rss.json"
    done = subprocess.run([sys.executable, bench_peers.WRAPPER, str(report), target, "--flag"])
    with open(report) as f:
        record = json.load(f)
    assert done.returncode == 3 and record["exit_code"] == 3 and record["argv"] == [target, "--flag"]
    assert 64 * MiB < record["vmhwm_bytes"] < 250 * MiB  # the 64 MiB block and an interpreter, not the parent
    del ballast


def test_wrapper_runs_modules_and_records_failures(tmp_path):
    (tmp_path / "target_mod.py").write_text("import sys\nprint('argv', sys.argv[1:])\n")
    report = tmp_path / "rss.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, bench_peers.WRAPPER, str(report), "-m", "target_mod", "a"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "argv ['a']" in done.stdout
    assert json.loads(report.read_text())["exit_code"] == 0
    target = _script(tmp_path, "raise ValueError('boom')\n")
    done = subprocess.run([sys.executable, bench_peers.WRAPPER, str(report), target], capture_output=True, text=True)
    assert done.returncode == 1 and "boom" in done.stderr and json.loads(report.read_text())["exit_code"] == 1


def test_measured_returns_wall_and_peak_and_raises_with_the_log(tmp_path):
    ok = _script(tmp_path, "print('fine')\n")
    got = bench_peers.measured([ok], str(tmp_path / "logs"), "ok")
    assert got["wall_seconds"] > 0 and 5 * MiB < got["peak_rss_bytes"] < 200 * MiB
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('the reason')\nsys.exit(5)\n")
    with pytest.raises(RuntimeError, match="exit code 5(.|\n)*the reason"):
        bench_peers.measured([str(bad)], str(tmp_path / "logs"), "bad")


# --- realised sparsity -----------------------------------------------------------------------------

def _save(directory, tensors):
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    return str(directory)


def test_realised_sparsity_counts_zeros_and_checks_the_other_tensors(tmp_path):
    torch.manual_seed(0)
    q, down = torch.randn(8, 8) + 5, torch.randn(8, 16) + 5  # no zeros
    norm = torch.ones(8)
    src = _save(tmp_path / "src", {"model.layers.0.self_attn.q_proj.weight": q,
                                   "model.layers.0.mlp.down_proj.weight": down, "model.norm.weight": norm})
    keep24 = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(8, 4)
    pruned = _save(tmp_path / "out", {"model.layers.0.self_attn.q_proj.weight": q * keep24[:, :8],
                                      "model.layers.0.mlp.down_proj.weight": down * keep24,
                                      "model.norm.weight": norm})
    got = bench_peers.realised_sparsity(pruned, src, "2:4")
    assert got["total"] == 0.5 and got["matrices"] == 2 and got["nm_valid"] is True
    assert got["other_tensors_changed"] == [] and got["missing_tensors"] == []
    unstructured = _save(tmp_path / "bad", {"model.layers.0.self_attn.q_proj.weight": q * (torch.rand(8, 8) > 0.5),
                                            "model.norm.weight": norm * 2})
    got = bench_peers.realised_sparsity(unstructured, src, "2:4")
    assert got["nm_valid"] is False and got["other_tensors_changed"] == ["model.norm.weight"]
    assert got["missing_tensors"] == ["model.layers.0.mlp.down_proj.weight"]


# --- texts -----------------------------------------------------------------------------------------

def test_overlap_groups_join_documents_that_share_a_section():
    import random

    rng = random.Random(0)
    section, tail = ("".join(rng.choice("abcdefgh ") for _ in range(n)) for n in (400, 300))
    docs = {"whole": "intro " + section + " outro", "part": section[50:350], "other": "z" * 300,
            "chained": section[150:] + tail, "far": tail + "q", "short overlap": section[:150] + "x" * 300}
    assert texts.overlap_groups(docs) == [["chained", "far", "part", "whole"], ["other"], ["short overlap"]]


def _assert_disjoint(calib, heldout):
    assert calib and heldout and not set(calib) & set(heldout)
    stretches = {t[i:i + texts.SHINGLE] for t in calib.values() for i in range(len(t) - texts.SHINGLE + 1)}
    for name, text in heldout.items():
        assert not any(text[i:i + texts.SHINGLE] in stretches for i in range(len(text) - texts.SHINGLE + 1)), name


def test_shakespeare_holds_out_the_quality_benchmarks_plays():
    calib, heldout = texts.shakespeare_documents()
    assert sorted(n.removesuffix("_gut") for n in heldout) == sorted(texts.HELDOUT)
    assert not set(calib) & set(heldout) and len(calib) >= 30
    assert not {texts._sha(t) for t in calib.values()} & {texts._sha(t) for t in heldout.values()}


def test_pydoc_split_is_by_topic_group_with_no_shared_text():
    calib, heldout = texts.pydoc_documents()
    _assert_disjoint(calib, heldout)
    assert sum(map(len, heldout.values())) > 30_000  # enough for tens of 512-token windows


def test_written_split_is_read_back_document_by_document(tmp_path):
    from unipruning.data import read_documents

    split = texts.write_split("pydoc", str(tmp_path))
    assert len(read_documents(split.calib)) == len(split.manifest["calib"])
    assert len(read_documents(split.heldout)) == len(split.manifest["heldout"])
    assert texts.write_split("pydoc", str(tmp_path)) == split and len(os.listdir(tmp_path)) == 1
    with pytest.raises(ValueError, match="unknown text domain"):
        texts.write_split("klingon", str(tmp_path))


# --- llm-compressor's side (needs llmcompressor) ---------------------------------------------------

@pytest.mark.slow  # budget: 30 s on 2 CPU cores (importing llmcompressor takes about 15)
def test_llmc_runner_builds_its_modifiers_and_dataset(tmp_path):
    pytest.importorskip("llmcompressor", reason="llmcompressor is not installed (pip install -e '.[bench]')")
    import llmc_oneshot

    gpt = llmc_oneshot.modifier("sparsegpt", 0.5, "2:4")
    assert (type(gpt).__name__, gpt.mask_structure, gpt.ignore) == ("SparseGPTModifier", "2:4", ["re:.*lm_head"])
    assert (gpt.dampening_frac, gpt.block_size) == (0.01, 128)
    assert llmc_oneshot.modifier("wanda", 0.5, "1:4").mask_structure == "3:4"  # theirs counts the zeros
    assert llmc_oneshot.modifier("wanda", 0.6, "unstructured").mask_structure == "0:0"
    windows = torch.randint(0, 100, (3, 16))
    torch.save(windows, tmp_path / "w.pt")
    data, shape = llmc_oneshot.dataset(str(tmp_path / "w.pt"))
    assert tuple(shape) == (3, 16) and data.column_names == ["input_ids", "attention_mask"]
    assert torch.equal(torch.tensor(data["input_ids"]), windows)
