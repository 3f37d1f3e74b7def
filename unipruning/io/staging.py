"""How outputs reach the disk without losing anything: checks on --out, staged and resumable output
directories renamed into place when complete, and files written whole or not at all.

An output directory is written in a hidden directory next to it and renamed when complete, so it appears
complete or not at all. A resumable run names that directory by a hash of everything that decides its
output, and keeps it when it fails or is killed, so that the same command finds it again. Single files
are written to `NAME.tmp`, flushed to the disk and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

from ..errors import UsageError


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_out(out: str, overwrite: bool, sources: dict[str, str]) -> None:
    """Refuse an `out` that would lose or clobber data: non-empty without overwrite, a file, or equal to /
    inside / containing one of the inputs ({parameter: path})."""
    out_real = os.path.realpath(out)
    for option, path in sources.items():
        src = os.path.realpath(path)
        if _inside(out_real, src):
            raise UsageError(f"`out` {out!r} must not be `{option}` or inside it")
        if _inside(src, out_real):
            raise UsageError(f"`out` {out!r} must not contain `{option}` {path!r}")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"`out` {out!r} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise UsageError(f"`out` {out!r} is not empty (pass `overwrite` to replace it)")


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary name to write `path` under; on success it is flushed to the disk and renamed."""
    tmp = path + ".tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def _commit(tmp: str, out: str) -> None:
    """Replace `out` by `tmp` in one rename (the old `out`, if any, is moved aside first and removed
    only after): the directory appears complete or not at all."""
    parent = os.path.dirname(out)
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ordinary_permissions(directory: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)  # mkdtemp makes it 0700; the output is an ordinary directory


@contextlib.contextmanager
def staged_directory(out: str) -> Iterator[str]:
    """Yield a temporary directory next to `out`; on success it replaces `out`, on failure it is removed."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    _ordinary_permissions(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, out)


def partial_directory(out: str, run_key: str) -> str:
    """Where the run named `run_key` keeps its partial state: a hidden directory next to `out`."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial-{run_key[:16]}")


@contextlib.contextmanager
def resumable_directory(out: str, run_key: str, overwrite: bool) -> Iterator[str]:
    """Like `staged_directory`, but the directory's name is fixed by `run_key` (a hash of everything
    that decides the output) and it is kept when the run fails or is killed, so that the same command
    finds it again and resumes; `overwrite` discards it. On success it replaces `out`."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = partial_directory(out, run_key)
    if overwrite and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp, exist_ok=True)
    yield tmp
    _commit(tmp, out)
