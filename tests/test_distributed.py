"""Several processes (torchrun, gloo on the CPU): data-parallel calibration and the weight-parallel OBS pass
write the bytes one process writes with the same settings (--batch-size, and one thread per process: the
thread count changes how a CPU BLAS splits the sums of the Hessians); two nodes meet at a c10d rendezvous;
a process that dies stops the others with one line each, and the run resumes to the same bytes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests._utils import make_checkpoint, read_all
from unipruning.cli import main

ARGS = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--sparsity", "0.6"]
JOBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchrun_jobs.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# 6 windows a step: 2 and 3 processes split them evenly. Calibration alone, and the OBS cases of issue 27
# (the saliency's mask, SparseGPT's own choice at 2:4, the guided rule with owl's counts, llm-compressor's
# order of the Hessians)
OBS = ["--nsamples", "12", "--seqlen", "32", "--batch-size", "6"]
OBS_CASES = {
    "mask-only": ["--sparsity", "0.6"],
    "unstructured": ["--sparsity", "0.6", "--reconstruct", "obs"],
    "sparsegpt-2of4": ["--metric", "sparsegpt", "--reconstruct", "obs", "--pattern", "2:4"],
    "guided": ["--preset", "quality", "--sparsity", "0.6"],
    "2of4-no-true-sequential": ["--pattern", "2:4", "--reconstruct", "obs", "--no-true-sequential"],
}


def output_bytes(directory) -> dict[str, bytes]:
    """Every file a run wrote but its report (timings, process count)."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            if name != "pruning_report.json":
                with open(os.path.join(root, name), "rb") as f:
                    found[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return found


def torchrun(processes: int, commands: list[list[str]], workdir) -> subprocess.CompletedProcess:
    """One torchrun launch running `commands` (argv lists of `unipruning`) in turn."""
    listing = os.path.join(workdir, f"jobs-{processes}.json")
    with open(listing, "w") as f:
        json.dump(commands, f)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", JOBS, listing],
                          capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture
def one_thread():
    """The one-process references run as each torchrun process does: one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def obs_references(tiny_llama, text_file, tmp_path_factory):
    """One process's outputs of every case, and of `mask --reconstruct obs` from the saliency of the first."""
    root, before = tmp_path_factory.mktemp("one_process"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case, extra in OBS_CASES.items():
            assert main(["prune", "--model", tiny_llama, "--out", str(root / case), "--calib", text_file,
                         "--device", "cpu", *OBS, *extra]) == 0
        assert main(mask_command(tiny_llama, text_file, root / "mask-only", root / "mask")) == 0
    finally:
        torch.set_num_threads(before)
    return {case: output_bytes(root / case) for case in [*OBS_CASES, "mask"]}


def mask_command(model, text_file, pruned, out) -> list[str]:
    return ["mask", "--model", model, "--saliency", str(pruned / "saliency"), "--out", str(out), "--pattern", "2:4",
            "--reconstruct", "obs", "--calib", text_file, "--batch-size", "6", "--device", "cpu"]


@pytest.mark.slow  # budget: about 60 s for both sizes on 2 CPU cores (a launch starts torch in each process)
@pytest.mark.parametrize("processes", [2, 3])
def test_several_processes_equal_one_process(processes, tiny_llama, text_file, obs_references, tmp_path):
    commands = [["prune", "--model", tiny_llama, "--out", str(tmp_path / case), "--calib", text_file, "--device",
                 "cpu", *OBS, *extra] for case, extra in OBS_CASES.items()]
    commands.append(mask_command(tiny_llama, text_file, tmp_path / "mask-only", tmp_path / "mask"))
    done = torchrun(processes, commands, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == len(commands)  # rank 0 alone writes and reports
    for case in [*OBS_CASES, "mask"]:
        with open(tmp_path / case / "pruning_report.json") as f:
            assert json.load(f)["processes"] == processes, case
        assert output_bytes(tmp_path / case) == obs_references[case], case
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(commands: list[list[list[str]]], workdir) -> list[subprocess.Popen]:
    """Two torchrun launchers, one process each, meeting at a c10d rendezvous on 127.0.0.1 (two nodes);
    commands[i] is node i's list of commands."""
    endpoint = f"127.0.0.1:{_free_port()}"
    launcher = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test"]
    procs = []
    for node, jobs in enumerate(commands):
        listing = os.path.join(workdir, f"node-{node}-{len(os.listdir(workdir))}.json")
        with open(listing, "w") as f:
            json.dump(jobs, f)
        procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node=1",
                                       JOBS, listing], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=ENV))
    return procs


def two_nodes(commands: list[list[list[str]]], workdir) -> list[subprocess.CompletedProcess]:
    procs = launch_two_nodes(commands, workdir)
    outputs = [p.communicate(timeout=600) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs, strict=True)]


def our_lines(done: list) -> list[str]:
    """The lines unipruning printed on stderr (torchrun adds its own report of a failed process)."""
    return [line for d in done for line in d.stderr.splitlines() if line.startswith("unipruning")]


@pytest.mark.slow  # budget: about 30 s on 2 CPU cores (two launchers, each starting torch twice)
def test_two_nodes_at_a_c10d_rendezvous_equal_one_process(tiny_llama, text_file, obs_references, tmp_path):
    """The unstructured OBS case on two "nodes"; then node 1 reads a model whose weights differ: one line."""
    out = tmp_path / "out"
    command = ["prune", "--model", tiny_llama, "--out", str(out), "--calib", text_file, "--device", "cpu", *OBS,
               *OBS_CASES["unstructured"]]
    other = str(tmp_path / "other")
    shutil.copytree(tiny_llama, other)
    tensors = read_all(other)
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    first = [*command[:4], str(tmp_path / "mismatch"), *command[5:]]
    other_weights = [*first[:2], other, *first[3:]]
    done = two_nodes([[command, first], [command, other_weights]], tmp_path)
    assert all(d.returncode != 0 for d in done), [d.stderr[-2000:] for d in done]
    assert output_bytes(out) == obs_references["unstructured"]
    lines = our_lines(done)
    assert len(lines) == 1 and "--model differs between the processes: rank 1" in lines[0], lines
    assert not os.path.exists(tmp_path / "mismatch")


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` under the launcher process `launcher` (from /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


@pytest.mark.slow  # budget: about 70 s on 2 CPU cores (a 4-block prune: one process, then two nodes twice)
def test_a_dead_rank_stops_the_others_and_the_run_resumes(text_file, tmp_path, one_thread):
    """Rank 1 killed in the OBS pass, on the other "node": no launcher tells rank 0, its next exchange fails."""
    source = make_checkpoint(tmp_path / "model", layers=4, hidden=64, intermediate=128, seed=7)
    command = ["prune", "--model", source, "--calib", text_file, "--nsamples", "32", "--seqlen", "64", "--batch-size",
               "2", "--reconstruct", "obs", "--device", "cpu"]
    assert main([*command, "--out", str(tmp_path / "reference")]) == 0
    command += ["--out", str(tmp_path / "out")]
    launchers = launch_two_nodes([[command], [command]], tmp_path)
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and all(p.poll() is None for p in launchers) and killed is None:
        partial = [d for d in os.listdir(tmp_path) if d.startswith(".out.partial-")]
        if partial and os.path.exists(tmp_path / partial[0] / ".recon" / "block-00001.safetensors"):
            killed = next(filter(None, (_worker_pid(p.pid, 1) for p in launchers)), None)
            if killed:
                os.kill(killed, signal.SIGKILL)
                stopped = time.time()
        time.sleep(0.02)
    assert killed, "the run ended before two blocks were reconstructed"
    done = [subprocess.CompletedProcess(p.args, p.returncode, *p.communicate(timeout=120)) for p in launchers]
    assert all(d.returncode != 0 for d in done) and time.time() - stopped < 60
    lines = our_lines(done)  # rank 0's, the only process left
    assert len(lines) == 1 and "rank 0: another process of this torchrun job stopped" in lines[0], lines
    assert "resumes from the partial state" in lines[0], lines
    done = two_nodes([[command], [command]], tmp_path)
    assert all(d.returncode == 0 for d in done), [d.stderr[-3000:] for d in done]
    with open(tmp_path / "out" / "pruning_report.json") as f:
        assert any(block["resumed"] for block in json.load(f)["reconstruction"]["blocks"])
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "reference")


def test_batch_size_must_split_over_the_processes(monkeypatch, tiny_llama, text_file, tmp_path, capsys):
    from unipruning.pipeline import distributed

    monkeypatch.setattr(distributed, "world", lambda: (0, 3))
    monkeypatch.setattr(distributed, "init_from_env", lambda device: device)
    assert main(["prune", "--model", tiny_llama, "--out", str(tmp_path / "o"), "--calib", text_file, *ARGS]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--batch-size 2 must be a multiple of the process count" in err[0]
    monkeypatch.setenv("RANK", "1")  # another process finds the same: rank 0 alone says it
    assert main(["prune", "--model", tiny_llama, "--out", str(tmp_path / "o"), "--calib", text_file, *ARGS]) == 2
    assert capsys.readouterr().err == ""


def test_jobs_that_cannot_share_their_work_are_refused(monkeypatch, tiny_llama, text_file, tmp_path, capsys):
    from unipruning.pipeline import distributed

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "init_from_env", lambda device: device)
    assert main(["prune", "--model", tiny_llama, "--out", str(tmp_path / "o"), "--calib", text_file, *ARGS,
                 "--feedback", "full"]) == 2
    assert "2 processes: --feedback full runs in one process" in capsys.readouterr().err
    saliency = tmp_path / "s"  # refused before the saliency is read
    assert main(["mask", "--model", tiny_llama, "--saliency", str(saliency), "--out", str(tmp_path / "m")]) == 2
    assert "2 processes: mask without --reconstruct obs" in capsys.readouterr().err


def test_matrices_are_dealt_out_by_cost():
    from unipruning.pipeline.weight_parallel import owners

    # SmolLM2's block in rows x columns^2 / 576^2: the largest first, each to the least loaded rank of its phase
    groups = [[("q", 576), ("k", 192), ("v", 192)], [("o", 576)], [("gate", 1536), ("up", 1536)], [("down", 4096)]]
    assert owners(groups, 2) == {"q": 0, "k": 1, "v": 1, "o": 1, "gate": 0, "up": 1, "down": 0}
    assert owners(groups, 3) == {"q": 0, "k": 1, "v": 2, "o": 1, "gate": 2, "up": 0, "down": 1}
    assert set(owners(groups, 1).values()) == {0}
    block = [[m for group in groups for m in group]]  # --no-true-sequential: one phase
    dealt = owners(block, 2)
    loads = [sum(c for n, c in block[0] if dealt[n] == r) for r in (0, 1)]
    assert loads == [4288, 4416]  # down and k on rank 0, the rest on rank 1: within 3% of half of 8704
