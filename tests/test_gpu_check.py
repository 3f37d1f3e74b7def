"""benchmarks/gpu_check.py without a GPU: the refusal, the dry run, the step runner (budgets, failures,
the deadline, needs, fallbacks), the output folder against the device's return limits, and the parsers
of pytest's junit XML, summarize.py's JSON, prune and bench_e2e reports on small fixtures."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
PY = sys.executable


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = _load()


def _cli(*args, env=None):
    return subprocess.run([PY, SCRIPT, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _py(code):
    return gc.Command([PY, "-c", code])


def _run(tmp_path, steps, deadline=60.0):
    out, work = tmp_path / "out", tmp_path / "work"
    results = gc.run_plan(steps, str(out), str(work), deadline, {"note": "test"})
    return {r.name: r for r in results}, out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _spawner(pidfile):
    """Code of a command that starts a sleeping child of its own, writes its pid, and sleeps."""
    return (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")


def _ends_soon(pidfile):
    pid = int(pidfile.read_text())
    for _ in range(50):
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


# ------------------------------------------------------------------------------------------- command line


def test_refuses_without_a_gpu_in_one_line(tmp_path):
    done = _cli("--out", str(tmp_path / "out"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_every_step_with_budget_and_command(tmp_path):
    done = _cli("--dry-run", "--work", str(tmp_path / "w"))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for step in ("env", "install", "install-plain", "aot-registers", "gpu-tests", "obs-kernels", "sparse-linear",
                 "pack", "fp8-24", "model", "prune-default", "prune-offload", "torchrun-nccl", "prune-obs", "eval",
                 "e2e-70b", "kernel-bench"):
        assert f"\n{step}  budget " in text
    for command in ("-m 'gpu or cuda_ext'", "UNIPRUNING_BUILD_CUDA=1", "pip install --no-deps --no-build-isolation",
                    "bench_sparse_linear.py --benchmark-json=", "summarize.py", "bench_e2e.py --shape 70b",
                    "--reconstruct obs", "--offload-activations always",
                    "torch.distributed.run --standalone --nproc_per_node=1 -m unipruning prune",
                    "aot_compile.py --device-check", "bench_fp8_24.py --json"):
        assert command in text, command
    assert f"deadline {gc.DEADLINE_S} s" in text
    assert not (tmp_path / "w").exists()  # a dry run creates nothing


def test_only_brings_what_a_step_needs_and_unknown_steps_are_refused():
    done = _cli("--dry-run", "--only", "pack")
    names = [line.split()[0] for line in done.stdout.splitlines() if "  budget " in line]
    assert names == ["install", "install-plain", "pack"]
    bad = _cli("--dry-run", "--only", "nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown step 'nope'" in bad.stderr


def test_budget_scale_multiplies_every_budget(tmp_path):
    plan = {s.name: s.budget_s for s in gc.build_plan(gc.parse_args(["--dry-run", "--budget-scale", "2"]), "w")}
    base = {s.name: s.budget_s for s in gc.build_plan(gc.parse_args(["--dry-run"]), "w")}
    assert plan == {k: 2 * v for k, v in base.items()}


def test_the_script_drives_no_internal_module_of_the_package():
    source = open(SCRIPT).read()
    assert "import unipruning" not in source and "from unipruning" not in source


# ------------------------------------------------------------------------------------------------ runner


def test_failures_and_timeouts_are_recorded_and_the_run_goes_on(tmp_path):
    steps = [
        gc.Step("fine", 20, "", [_py("print('hello')")]),
        gc.Step("broken", 20, "", [_py("import sys; print('ValueError: bad input', file=sys.stderr); sys.exit(3)")]),
        gc.Step("hangs", 1.5, "", [_py("import time; time.sleep(60)")]),
        gc.Step("after", 20, "", [_py("pass")]),
        gc.Step("dependent", 20, "", [_py("pass")], needs=[("broken",)]),
    ]
    start = time.monotonic()
    results, _ = _run(tmp_path, steps)
    assert time.monotonic() - start < 30
    assert results["fine"].status == "ok" and "hello" in results["fine"].log
    assert results["broken"].status == "failed" and results["broken"].returncode == 3
    assert "exit 3" in results["broken"].reason and "ValueError: bad input" in results["broken"].reason
    assert results["hangs"].status == "timeout" and results["hangs"].seconds < 10
    assert results["after"].status == "ok"
    assert results["dependent"].status == "skipped" and results["dependent"].reason == "needs broken (broken: failed)"


def test_a_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    results, _ = _run(tmp_path, [gc.Step("spawner", 2, "", [_py(_spawner(pidfile))])])
    assert results["spawner"].status == "timeout"
    assert _ends_soon(pidfile)


def test_the_deadline_cuts_a_step_short_and_skips_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "MIN_STEP_S", 1.0)
    steps = [gc.Step("long", 100, "", [_py("import time; time.sleep(60)")]), gc.Step("next", 5, "", [_py("pass")])]
    results, _ = _run(tmp_path, steps, deadline=2.0)
    assert results["long"].status == "timeout" and "overall deadline" in results["long"].reason
    assert results["next"].status == "skipped" and results["next"].reason.startswith("overall deadline")


def test_a_fallback_runs_only_when_its_step_failed(tmp_path):
    steps = [gc.Step("a", 10, "", [_py("pass")]), gc.Step("a-fallback", 10, "", [_py("pass")], run_if_failed="a"),
             gc.Step("b", 10, "", [_py("raise SystemExit(1)")]),
             gc.Step("b-fallback", 10, "", [_py("pass")], run_if_failed="b"),
             gc.Step("uses-b", 10, "", [_py("pass")], needs=[("b", "b-fallback")])]
    results, _ = _run(tmp_path, steps)
    assert results["a-fallback"].status == "skipped" and "not needed" in results["a-fallback"].reason
    assert results["b-fallback"].status == "ok" and results["uses-b"].status == "ok"


def test_keep_going_runs_every_command_and_reports_the_first_failure(tmp_path):
    marker = tmp_path / "ran"
    step = gc.Step("several", 20, "", [_py("import sys; print('RuntimeError: first'); sys.exit(4)"),
                                       _py(f"open({str(marker)!r}, 'w').write('x')")], keep_going=True)
    results, _ = _run(tmp_path, [step])
    assert marker.exists()
    assert results["several"].status == "failed" and "RuntimeError: first" in results["several"].reason


def test_stdout_of_a_command_can_go_to_its_own_file(tmp_path):
    target = tmp_path / "result.json"
    step = gc.Step("json", 20, "", [gc.Command([PY, "-c", "print('{\"x\": 1}')"], stdout=str(target))],
                   artifacts={"json": str(target)}, figures=lambda a: a["json"])
    results, _ = _run(tmp_path, [step])
    assert results["json"].figures == {"x": 1}


# ------------------------------------------------------------------------------------------------ output


def test_the_output_folder_fits_what_the_device_returns(tmp_path):
    big = "print('x' * 4_000_000)"  # a chatty step: its log is cut to the tail
    steps = [gc.Step(f"s{i}", 20, "", [_py(big if i == 0 else "pass")]) for i in range(12)]
    steps.append(gc.Step("skipped", 20, "", [_py("pass")], skip_reason="not here"))
    results, out = _run(tmp_path, steps)
    files = sorted(os.listdir(out))
    assert files == ["benchmarks.json", "logs.json", "prune.json", "results.json", "summary.json", "tests.json"]
    assert gc.check_return_limits(str(out)) == []
    contents = {f: json.loads((out / f).read_text()) for f in files}  # all valid JSON
    summary = contents["summary.json"]
    assert [s["name"] for s in summary["steps"]] == [s.name for s in steps]
    assert summary["steps"][-1]["status"] == "skipped" and summary["steps"][-1]["reason"] == "not here"
    assert summary["totals"] == {"ok": 12, "failed": 0, "timeout": 0, "skipped": 1}
    assert summary["return_limits"] == "ok" and summary["meta"] == {"note": "test"}
    assert all(k in summary["steps"][0] for k in ("status", "reason", "seconds", "budget_s", "figures", "commands"))
    assert len(contents["logs.json"]["s0"]["log_tail"]) <= gc.LOG_TAIL_BYTES
    assert "skipped" not in contents["logs.json"]


def test_write_json_stays_under_its_limit_and_valid(tmp_path):
    path = tmp_path / "big.json"
    size = gc.write_json(str(path), {"rows": ["y" * 100] * 1000}, max_bytes=5000)
    data = json.loads(path.read_text())
    assert size == path.stat().st_size <= 5000 and data["truncated"] and data["original_bytes"] > 100_000
    gc.write_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}


def test_return_limits_flag_what_would_not_come_back(tmp_path, monkeypatch):
    for i in range(9):
        (tmp_path / f"f{i}.json").write_text("{}")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.json").write_text("{}")
    (tmp_path / "odd name.json").write_text("{}")
    monkeypatch.setitem(gc.RETURN_LIMITS, "file_bytes", 100)
    (tmp_path / "large.json").write_text("x" * 101)
    problems = " | ".join(gc.check_return_limits(str(tmp_path)))
    assert "12 files, over 8" in problems and "deep.json: more than 2 folders down" in problems
    assert "odd name.json: a name" in problems and "large.json: 101 bytes" in problems


def test_git_hash_falls_back_to_the_given_one_outside_a_checkout(tmp_path):
    assert gc.git_hash("abc123", root=str(tmp_path)) == {"hash": "abc123", "source": "--git-hash"}
    here = gc.git_hash(None)
    assert len(here["hash"]) == 40 and here["source"] == "git"


# ----------------------------------------------------------------------------------------------- parsing

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_packing" name="test_ok[bf16]" time="0.5" />
<testcase classname="tests.test_packing" name="test_bad" time="1.0">
<failure message="AssertionError: assert 1 == 2&#10;more">trace</failure></testcase>
<testcase classname="tests.test_packing" name="test_ext" time="0.0"><skipped type="pytest.skip"
 message="unipruning._C is not built (UNIPRUNING_BUILD_CUDA=1)">skip</skipped></testcase>
<testcase classname="tests.test_kernels" name="test_err" time="0.1"><error message="fixture failed">e</error></testcase>
</testsuite></testsuites>"""


def test_junit_is_parsed_into_counts_failures_and_skip_reasons(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(JUNIT)
    parsed = gc.parse_junit(str(path))
    assert parsed["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1}
    figures = gc._junit_figures({"junit": parsed})
    assert figures["not_passed"] == ["tests.test_packing::test_bad: AssertionError: assert 1 == 2",
                                     "tests.test_kernels::test_err: fixture failed"]
    assert figures["skip_reasons"] == {"unipruning._C is not built (UNIPRUNING_BUILD_CUDA=1)": 1}


def _row(name, params, ms, gbps=100.0):
    return {"name": name, "group": "benchmarks/x.py", "params": params, "ms": ms, "gbps": gbps, "bytes": 1,
            "rounds": 20}


def test_sparse_linear_speedups_come_from_summarize_rows():
    rows = [_row(f"test_linear[{p}-4096x4096-2048-bf16]", {"provider": p, "shape": [4096, 4096], "tokens": 2048,
                                                           "dtype": "UNSERIALIZABLE[torch.bfloat16]"}, ms)
            for p, ms in (("dense", 2.0), ("cutlass", 1.0), ("cusparselt", 0.8))]
    figures = gc._sparse_linear_figures({"bench": {"results": rows}})
    assert figures["speedups"] == [{"shape": "4096x4096", "tokens": 2048, "dtype": "bf16", "dense_ms": 2.0,
                                    "cutlass_ms": 1.0, "cusparselt_ms": 0.8, "cutlass_speedup": 2.0,
                                    "cusparselt_speedup": 2.5}]


def test_kernel_rows_carry_the_fraction_of_copy():
    rows = [dict(_row("test_copy_bandwidth", {}, 0.7, 3000.0), fraction_of_copy=1.0),
            dict(_row("test_mirror_step[4096x4096-triton]", {}, 0.5, 1500.0), fraction_of_copy=0.5)]
    figures = gc._kernel_figures({"bench": {"copy_bandwidth_gbps": 3000.0, "results": rows}})
    assert figures["copy_bandwidth_gbps"] == 3000.0 and figures["rows"][1]["of_copy"] == 0.5


def test_prune_figures_from_a_report():
    report = {"wall_seconds": 30.0, "calibration_seconds": 25.0, "processes": 1,
              "blocks": [{"seconds": 5.0}, {"seconds": 1.0}, {"seconds": 2.0}], "total": {"sparsity": 0.5},
              "peak_memory": {"gpu_max_allocated_bytes": 3 << 30, "cpu_max_rss_bytes": 1 << 30},
              "settings": {"backend_used": "triton", "device_used": "cuda"}, "reconstruction": {"seconds": 7.0}}
    figures = gc._prune_figures({"report": report, "json": {"equal": True}})
    assert figures["block_seconds_mean_after_first"] == 1.5 and figures["peak_gpu_allocated_gib"] == 3.0
    assert figures["reconstruction_seconds"] == 7.0 and figures["same_tensors_as_prune_default"] is True
    assert figures["backend"] == "triton" and figures["blocks"] == 3


def test_e2e_figures_label_the_extrapolation():
    e2e = {"layers_written": 3, "nsamples": 128, "seqlen": 2048, "calibration_seconds_per_layer": [3.0, 2.0, 2.0],
           "extrapolation": {"note": "NOT measured: ...", "layers": 80, "seconds": 170.0}}
    figures = gc._e2e_figures({"json": e2e})
    assert figures["EXTRAPOLATED_not_measured"] == {"layers": 80, "seconds": 170.0, "how": "NOT measured: ..."}
    assert figures["tokens"] == "128 x 2048"


def test_a_failure_is_told_by_its_exception_or_error_line():
    pip = "Traceback (most recent call last):\n  File x\nOSError: CUDA_HOME is not set\nnote: ...\nhint: See above"
    assert gc.telling_line(pip) == "OSError: CUDA_HOME is not set"
    nvcc = "[1/3] nvcc ...\ncsrc/pack24.cu(3): error: identifier \"x\" is undefined\nninja: build stopped"
    assert gc.telling_line(nvcc) == 'csrc/pack24.cu(3): error: identifier "x" is undefined'
    assert gc.telling_line("just this\n") == "just this"


def test_a_figure_parser_that_breaks_does_not_stop_the_run(tmp_path):
    step = gc.Step("x", 10, "", [_py("pass")], figures=lambda a: a["missing"])
    results, _ = _run(tmp_path, [step])
    assert results["x"].status == "ok" and "KeyError" in results["x"].figures["figures_error"]


# ------------------------------------------------------------------------------------------------ helpers


def _save(directory, tensors):
    from safetensors.torch import save_file

    os.makedirs(directory / "saliency", exist_ok=True)
    save_file({"w": tensors[0]}, str(directory / "model.safetensors"))
    save_file({"t": tensors[1]}, str(directory / "saliency" / "s.safetensors"))


def test_compare_tells_equal_outputs_from_different_ones(tmp_path):
    w, t = torch.randn(4, 8).bfloat16(), torch.tensor(0.25)
    _save(tmp_path / "a", (w, t))
    _save(tmp_path / "b", (w.clone(), t.clone()))
    _save(tmp_path / "c", (w, torch.tensor(0.5)))  # a 0-d threshold differs
    assert gc.helper_compare(str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "ab.json")) == 0
    assert json.loads((tmp_path / "ab.json").read_text())["tensors"] == 2
    assert gc.helper_compare(str(tmp_path / "a"), str(tmp_path / "c"), str(tmp_path / "ac.json")) == 1
    assert json.loads((tmp_path / "ac.json").read_text())["differing"] == ["saliency/s.safetensors:t"]


@pytest.mark.slow  # budget: 60 s on 2 CPU cores (measured 27-36 s: a 49152 x 576 embedding, a BPE on 4.7 MB of text)
def test_make_model_writes_a_smollm2_shaped_checkpoint_and_the_texts(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    done = _cli("--helper", "make-model", str(tmp_path), "--layers", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    config = AutoConfig.from_pretrained(tmp_path / "model")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "tie_word_embeddings"):
        assert getattr(config, key) == gc.SMOLLM2[key]
    assert config.num_hidden_layers == 1 and str(config.dtype).endswith("bfloat16")
    ids = AutoTokenizer.from_pretrained(tmp_path / "model")("To be, or not to be")["input_ids"]
    assert 0 < len(ids) and max(ids) < gc.TOKENIZER_VOCAB
    calib, heldout = (tmp_path / "calib.txt").read_text(), (tmp_path / "heldout.txt").read_text()
    assert "Enter Othello" in heldout and "Enter Othello" not in calib  # split by play
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["weights"] == "random weights, SmolLM2 shape"


def test_sigterm_stops_the_step_kills_its_group_and_keeps_the_results(tmp_path):
    pidfile, out = tmp_path / "grandchild.pid", tmp_path / "out"
    spawn = _spawner(pidfile)
    driver = f"""
import signal, sys
sys.path.insert(0, {os.path.dirname(SCRIPT)!r})
import gpu_check as gc
signal.signal(signal.SIGTERM, gc._on_sigterm)
steps = [gc.Step("first", 20, "", [gc.Command([sys.executable, "-c", "pass"])]),
         gc.Step("hangs", 60, "", [gc.Command([sys.executable, "-c", {spawn!r}])])]
try:
    gc.run_plan(steps, {str(out)!r}, {str(tmp_path / 'work')!r}, 100, {{}})
except gc.Terminated:
    sys.exit(143)
"""
    proc = subprocess.Popen([PY, "-c", driver])
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.1)
    proc.terminate()
    assert proc.wait(timeout=30) == 143
    assert _ends_soon(pidfile)
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in steps] == [("first", "ok"), ("hangs", "timeout")]
    assert "terminated (SIGTERM)" in steps[1]["reason"]


