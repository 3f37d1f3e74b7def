"""What identifies a source model: the content of its weights, not its path or its shapes.

A checkpoint's identity is the sha256 over its tensors (name, dtype, shape and the sha256 of the tensor's
bytes), so it does not depend on how the tensors are split into shards or on the files' metadata, and any
changed weight changes it. The per-tensor digests of a safetensors file are computed in one sequential
read and cached in a small JSON file under the cache root, keyed by the file's device, inode, size,
modification and change times (a change time cannot be set back by a user), so a 70B model is hashed
once, not on every run. The cache is best effort: unwritable, it is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile

from ..errors import UsageError
from ..files import read_regular

log = logging.getLogger("unipruning")

CACHE_FILE = "tensor-digests.json"
_CHUNK = 1 << 24
_MAX_ENTRIES = 4096  # files remembered; the oldest are dropped beyond


def cache_root() -> str:
    """$UNIPRUNING_CACHE, else $XDG_CACHE_HOME/unipruning or ~/.cache/unipruning."""
    root = os.environ.get("UNIPRUNING_CACHE")
    if root:
        return root
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unipruning")


def _stat_key(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _hash_tensors(path: str) -> dict[str, str]:
    """{tensor name: sha256 of its bytes} of one safetensors file, read once from start to end (the
    header has been validated by safetensors before: offsets lie inside the file)."""
    digests = {}
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        start = 8 + length
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            lo, hi = info["data_offsets"]
            f.seek(start + lo)
            digest, left = hashlib.sha256(), hi - lo
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise OSError(f"{path}: ends inside tensor {name}")
                digest.update(chunk)
                left -= len(chunk)
            digests[name] = f"{info['dtype']}:{info['shape']}:{digest.hexdigest()}"
    return digests


def _load_cache(path: str) -> dict:
    try:  # a regular file of bounded size, never blocking: anything else is no cache
        cache = json.loads(read_regular(path, "UNIPRUNING_CACHE", 1 << 26))
        return cache if isinstance(cache, dict) else {}
    except (UsageError, ValueError, RecursionError):
        return {}


def _store_cache(path: str, cache: dict) -> None:
    """Write the cache whole or not at all (a unique temporary name: runs may write it at once)."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tensor-digests-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dict(list(cache.items())[-_MAX_ENTRIES:]), f)
            os.replace(tmp, path)
        except OSError:
            os.remove(tmp)
            raise


def tensor_digests(files: list[str]) -> dict[str, str]:
    """{tensor name: 'dtype:shape:sha256'} over safetensors `files`, from the cache where a file's
    identity (device, inode, size, mtime, ctime) is unchanged, else read and remembered."""
    cache_path = os.path.join(cache_root(), CACHE_FILE)
    cache, changed, out = _load_cache(cache_path), False, {}
    for path in files:
        real, key = os.path.realpath(path), _stat_key(path)
        entry = cache.get(real)
        if not (isinstance(entry, dict) and entry.get("stat") == key and isinstance(entry.get("tensors"), dict)):
            log.debug("hashing %s", path)
            entry = {"stat": key, "tensors": _hash_tensors(path)}
            cache.pop(real, None)
            if _stat_key(path) == key:  # not remembered when the file changed while it was read
                cache[real] = entry
                changed = True
        out.update(entry["tensors"])
    if changed:
        _store_cache(cache_path, cache)
    return out


def content_digest(files: list[str]) -> str:
    """sha256 identifying the tensors of safetensors `files`: names, dtypes, shapes and bytes."""
    digests = tensor_digests(files)
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()
