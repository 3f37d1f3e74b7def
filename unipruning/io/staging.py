"""How outputs reach the disk without losing anything: checks on --out, one run per --out at a time,
staged and resumable output directories renamed into place when complete, files written whole or not
at all.

`writing(out, ...)` is the one way a job writes an output directory:
- it takes an advisory lock (`flock` on `.NAME.lock` next to `out`, holding the PID) for the whole run, so
  a second run into the same `out` fails at once naming the first one's PID;
- it checks `out` again under the lock (`check_out`: never an input, never a non-empty directory without
  `overwrite`, and `overwrite` only replaces an earlier output);
- it writes into a hidden directory next to `out`, renamed to `out` when complete: `.NAME.partial-<run
  key>` for a resumable run (named by a hash of everything that decides the output, kept when the run is
  interrupted or fails so that the same command, with or without `overwrite`, resumes from it), or
  `.NAME.partial-staged`, removed on failure;
- a full disk removes the partial directory (nothing half-written keeps the disk full), a bad input found
  mid-run removes a resumable one (it would fail the same way again), and a successful run removes the
  stale partial state other runs left for the same `out`.
Single files are written to `NAME.tmp`, flushed to the disk and renamed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator

from ..errors import UsageError

log = logging.getLogger("unipruning")

# what prune/mask, pack and pack --format fp8-2:4 write last
OUTPUT_MARKERS = ("pruning_report.json", "packing_report.json", "fp8_24_report.json")
STAGED = "staged"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def target(out: str) -> str:
    """The directory a run writes for `out`: its absolute path, or where it points when it is a link."""
    return os.path.realpath(out) if os.path.islink(out) else os.path.abspath(out)


def _is_output(directory: str) -> bool:
    """Whether `directory` is something unipruning wrote: a report at its top, or only such directories
    (the demo's outputs)."""
    names = os.listdir(directory)
    if any(name in names for name in OUTPUT_MARKERS):
        return True
    paths = [os.path.join(directory, name) for name in names]
    return bool(paths) and all(os.path.isdir(p) and not os.path.islink(p) and _is_output(p) for p in paths)


def _check_place(out: str) -> None:
    if os.path.islink(out) and not os.path.exists(out):
        raise UsageError(f"`out` {out!r} is a symbolic link to {os.readlink(out)!r}, which does not exist: "
                         "create its target or pass another `out`")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"`out` {out!r}: {parent!r} is not a directory")


def _read_places(path: str) -> list[str]:
    """Where reading `path` reads: its real path and, for a directory, the real paths its symbolic links
    point to (a hub snapshot is a directory of links into the cache's blobs)."""
    real = os.path.realpath(path)
    if not os.path.isdir(path):
        return [real]
    with contextlib.suppress(OSError):
        links = [os.path.join(path, name) for name in os.listdir(path) if os.path.islink(os.path.join(path, name))]
        return [real, *(os.path.realpath(link) for link in links)]
    return [real]


def check_out(out: str, overwrite: bool, sources: dict[str, str | None]) -> None:
    """Refuse an `out` that would lose or clobber data: equal to / inside / containing one of the inputs
    ({parameter: path}; None and paths that do not exist are skipped), a file, a dangling link, non-empty
    without overwrite, or, with overwrite, a non-empty directory that is not an earlier output."""
    if not out:  # "" is the working directory to os.path.abspath, and exists() says False: refused
        raise UsageError("`out`: expected a directory path, got an empty string")
    out_real = os.path.realpath(out)
    for option, path in sources.items():
        if path is None or not os.path.exists(path):
            continue
        if _inside(out_real, os.path.realpath(path)):
            raise UsageError(f"`out` {out!r} must not be `{option}` {path!r} or inside it")
        for src in _read_places(path):
            if _inside(src, out_real):
                raise UsageError(f"`out` {out!r} contains `{option}` {path!r}"
                                 f"{'' if src == os.path.realpath(path) else f' (its file {src})'}: writing it "
                                 "would delete that input; choose another `out`")
    _check_place(out)
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise UsageError(f"`out` {out!r} exists and is not a directory")
    if os.listdir(out) and not overwrite:
        raise UsageError(f"`out` {out!r} is not empty (pass `overwrite` to replace it)")
    if os.listdir(out) and not _is_output(out):
        raise UsageError(f"`out` {out!r} is not empty and is not an earlier unipruning output (no "
                         f"{' or '.join(OUTPUT_MARKERS)}): `overwrite` replaces only those; empty it yourself or "
                         "choose another `out`")


def _check_writable(out: str) -> None:
    """An environment failure (exit 1), found before any work: `out` would land on a read-only
    filesystem or in a directory we may not write."""
    place = os.path.dirname(target(out))
    while not os.path.exists(place):
        place = os.path.dirname(place)
    if not os.access(place, os.W_OK | os.X_OK):
        readonly = bool(os.statvfs(place).f_flag & os.ST_RDONLY)
        code = errno.EROFS if readonly else errno.EACCES
        raise OSError(code, os.strerror(code), place)


def preflight(out: str, overwrite: bool, sources: dict[str, str | None], lock: bool = True) -> None:
    """The checks of `out` a job makes before its heavy reading (`writing` makes them again under the
    lock): `check_out`, a writable place, and (`lock`) that no other run holds the lock. Writes nothing."""
    check_out(out, overwrite, sources)
    _check_writable(out)
    if lock:
        probe_lock(out)


# ------------------------------------------------------------------------------------------ the lock
def lock_path(out: str) -> str:
    path = target(out)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")


def _busy(out: str, path: str) -> UsageError:
    pid = ""
    for _ in range(10):  # the holder writes its PID right after taking the lock
        with contextlib.suppress(OSError), open(path) as f:
            pid = f.read().strip()
        if pid:
            break
        time.sleep(0.02)
    return UsageError(f"`out` {out!r} is being written by another unipruning run (PID {pid or 'unknown'}, lock "
                      f"{path}): wait for it to finish or choose another `out`")


def _try_lock(fd: int, wait: bool) -> bool:
    """flock `fd`; a lock held only for an instant (another run's probe) is retried for 0.2 s."""
    if wait:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    for _ in range(5):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.04)
    return False


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def probe_lock(out: str) -> None:
    """Refuse `out` when another run holds its lock, writing nothing (for checks and `--dry-run`)."""
    path = lock_path(out)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody holds it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(out, path) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def out_lock(out: str, wait: bool = False) -> Iterator[None]:
    """Hold the advisory lock of `out` (its file holds our PID; removed on release). Another holder:
    a one-line error naming its PID, or, with `wait`, wait for it."""
    path = lock_path(out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd, wait):
            os.close(fd)
            raise _busy(out, path)
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)


# ------------------------------------------------------------------------------------------ files
def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary name to write `path` under; on success it is flushed to the disk and renamed."""
    tmp = path + ".tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, payload: dict) -> None:
    """A JSON file written whole or not at all."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def directory_bytes(directory: str) -> int:
    total = 0
    for root, _, names in os.walk(directory):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------ directories
def _sibling(out: str, suffix: str) -> str:
    path = target(out)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{suffix}")


def partial_directory(out: str, run_key: str) -> str:
    """Where the run named `run_key` keeps its partial state: a hidden directory next to `out`."""
    return _sibling(out, f"partial-{run_key[:16]}")


def _commit(tmp: str, out: str) -> None:
    """Replace `out` by `tmp` in one rename (the old `out`, if any, is moved aside first and removed
    only after): the directory appears complete or not at all."""
    old = _sibling(out, "old-output")
    if os.path.lexists(old):
        shutil.rmtree(old)  # left by a run killed between the two renames below
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync_directory(os.path.dirname(out))
    if os.path.lexists(old):
        shutil.rmtree(old)


def _ordinary_directory(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)  # an ordinary directory, whatever made it


def remove_stale(out: str) -> None:
    """Remove the partial state that earlier runs left for `out` (a successful run has replaced what
    they were writing); each one is named with its size on stderr."""
    path = target(out)
    name = re.escape(os.path.basename(path))
    stale = re.compile(rf"^\.{name}\.(partial-([0-9a-f]{{16}}|{STAGED}|[a-z0-9_]{{8}})|old-(output|[a-z0-9_]{{8}}))$")
    parent = os.path.dirname(path)
    for entry in sorted(os.listdir(parent)):
        full = os.path.join(parent, entry)
        if stale.match(entry) and os.path.isdir(full) and not os.path.islink(full):
            size = directory_bytes(full)
            shutil.rmtree(full, ignore_errors=True)
            log.info("removed stale partial state %s (%s)", full, mib(size))


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL
    text = str(exc)  # safetensors reports its write errors as SafetensorError text
    return type(exc).__name__ == "SafetensorError" and any(k in text for k in ("StorageFull", "QuotaExceeded",
                                                                               "No space left"))


def _stopped(exc: BaseException, directory: str, keep: bool) -> BaseException:
    """What a run that stopped with `exc` leaves: its partial `directory` kept (`keep`, noted on the
    exception for the command line's one line) or removed (a full disk always: nothing is left that keeps
    it full; a bad input found on the way: the same command would fail the same way). Returns the
    exception to raise (a full disk reported by safetensors becomes the OSError it is)."""
    full = _disk_full(exc)
    if keep and not full and not isinstance(exc, UsageError):
        _note(exc, "partial_state", directory)
    else:
        shutil.rmtree(directory, ignore_errors=True)
    if full and not isinstance(exc, OSError):
        exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)
    _note(exc, "staging", directory)
    return exc


def _note(exc: BaseException, key: str, value: str) -> None:
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, key, value)


@contextlib.contextmanager
def staged_directory(out: str, run_key: str | None = None) -> Iterator[str]:
    """Yield the directory `out` is written in, next to it; on success it replaces `out`. Without a
    `run_key` it is `.NAME.partial-staged` (emptied first: the caller holds the lock, so any such directory
    is a killed run's), removed on failure. With one it is named by `run_key` (a hash of everything that
    decides the output) and kept when the run stops, so that the same command finds it again and resumes
    (see `_stopped` for when it is not)."""
    out = target(out)
    keep = run_key is not None
    tmp = partial_directory(out, run_key) if keep else _sibling(out, f"partial-{STAGED}")
    if not keep and os.path.lexists(tmp):
        shutil.rmtree(tmp)
    _ordinary_directory(tmp)
    try:
        yield tmp
    except BaseException as exc:
        raised = _stopped(exc, tmp, keep)
        if raised is exc:
            raise
        raise raised from exc
    _commit(tmp, out)


@contextlib.contextmanager
def writing(out: str, overwrite: bool, sources: dict[str, str | None], run_key: str | None = None) -> Iterator[str]:
    """The staging directory of a job writing `out` (resumable when `run_key` is given), under the lock
    of `out`, with `out` checked again under it; success removes the stale partial directories."""
    with out_lock(out):
        check_out(out, overwrite, sources)
        with staged_directory(out, run_key) as staging:
            yield staging
        remove_stale(out)
