"""Hub model ids through huggingface_hub's cache (io/hub.py), without network: a cache directory laid out by
hand as the hub lays it out (models--org--name/{blobs, refs/main, snapshots/<commit>/ -> blobs}), read with
HF_HUB_OFFLINE=1; and the one-line answers when an id is not cached."""

import hashlib
import os
import subprocess
import sys

import pytest

from tests._utils import read_all
from unipruning import UsageError, offline
from unipruning.cli import main
from unipruning.io.hub import is_hub_id, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def hub_cache(root, repo_id: str, source: str, commits=(COMMIT,), branch_commit=COMMIT) -> str:
    """A cache holding `source`'s files as repository `repo_id`: each file a blob named by its sha256,
    each snapshot a directory of relative symlinks into the blobs, refs/main naming `branch_commit`."""
    repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(os.path.join(repo, "refs"))
    for commit in commits:
        snapshot = os.path.join(repo, "snapshots", commit)
        os.makedirs(snapshot)
        for name in sorted(os.listdir(source)):
            with open(os.path.join(source, name), "rb") as f:
                data = f.read()
            blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
            if not os.path.exists(blob):
                with open(blob, "wb") as f:
                    f.write(data)
            os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(branch_commit)
    return repo


@pytest.fixture()
def offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    offline.forget()
    yield
    offline.forget()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("hub")
    hub_cache(str(root), "org/tiny-llama", tiny_llama, commits=(COMMIT, OTHER))
    return str(root)


def test_hub_ids_and_local_paths():
    assert is_hub_id("meta-llama/Llama-2-7b-hf") and is_hub_id("org/name.v2")
    assert not is_hub_id("./llama") and not is_hub_id("/abs/path") and not is_hub_id("gpt2")
    assert not is_hub_id("a/b/c")
    assert resolve_model("./not-a-hub-id") == "./not-a-hub-id"  # the job's own checks word the error


def test_offline_cache_serves_the_snapshot_in_place(cache, offline_env):
    path = resolve_model("org/tiny-llama", cache_dir=cache)
    assert path == os.path.join(cache, "models--org--tiny-llama", "snapshots", COMMIT)
    assert os.path.islink(os.path.join(path, "model.safetensors"))  # the cache's own file: nothing copied
    other = resolve_model("org/tiny-llama", revision=OTHER, cache_dir=cache)
    assert other.endswith(OTHER)


def test_prune_and_eval_by_hub_id_read_the_cache_in_place(cache, offline_env, tiny_llama, text_file, tmp_path):
    blobs = os.path.join(cache, "models--org--tiny-llama", "blobs")
    before = sorted((n, os.stat(os.path.join(blobs, n)).st_mtime_ns) for n in os.listdir(blobs))
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "org/tiny-llama", "--cache-dir", cache, "--out", str(out), "--calib",
                 text_file, "--nsamples", "4", "--seqlen", "32", "--quiet"]) == 0
    reference = tmp_path / "reference"
    assert main(["prune", "--model", tiny_llama, "--out", str(reference), "--calib", text_file, "--nsamples", "4",
                 "--seqlen", "32", "--quiet"]) == 0
    a, b = read_all(out), read_all(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # the same model, the same bytes
    assert sorted((n, os.stat(os.path.join(blobs, n)).st_mtime_ns) for n in os.listdir(blobs)) == before
    assert main(["eval", "--model", "org/tiny-llama", "--cache_dir", cache, "--data", text_file, "--seqlen", "64",
                 "--quiet"]) == 0


def test_an_id_not_in_the_cache_is_one_line(cache, offline_env):
    with pytest.raises(UsageError) as info:
        resolve_model("org/absent", cache_dir=cache)
    message = str(info.value)
    assert "\n" not in message and "not in the hub cache" in message and "HF_HUB_OFFLINE is set" in message
    assert "pass a local model directory" in message
    with pytest.raises(UsageError, match="not in the hub cache"):
        resolve_model("org/tiny-llama", revision="v9", cache_dir=cache)


def test_unreachable_hub_without_the_variable_answers_fast(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    offline.forget()
    monkeypatch.setattr(offline, "_probe", lambda timeout: "https://huggingface.co did not answer (ConnectError)")
    try:
        assert resolve_model("org/tiny-llama", cache_dir=cache).endswith(COMMIT)  # the cache still serves
        with pytest.raises(UsageError, match=r"unreachable \(https://huggingface.co did not answer"):
            resolve_model("org/absent", cache_dir=cache)
    finally:
        offline.forget()


def test_revision_of_a_local_directory_is_refused(tiny_llama):
    with pytest.raises(UsageError, match="`revision` applies to hub ids"):
        resolve_model(tiny_llama, revision="main")


@pytest.mark.slow  # budget: 75 s measured on 2 loaded CPU cores (two fresh processes import torch)
def test_the_command_line_offline_end_to_end(cache, text_file, tmp_path):
    """In a fresh process, as a user runs it: HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at the cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache}
    done = subprocess.run([sys.executable, "-m", "unipruning", "eval", "--model", "org/tiny-llama", "--data",
                           text_file, "--seqlen", "64", "--json"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"snapshots/{COMMIT}" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "unipruning", "eval", "--model", "org/absent"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "--model" in missing.stderr and "not in the hub cache" in missing.stderr
