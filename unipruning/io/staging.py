"""How outputs reach the disk without losing anything: one run per --out at a time, staged and resumable
output directories renamed into place when complete, files written whole or not at all (the checks of
`--out` itself are in io/places.py).

`writing(out, ...)` is the one way a job writes an output directory:
- it takes an advisory lock (`flock` on `.NAME.lock` next to `out`, holding the PID) for the whole run, so
  a second run into the same `out` fails at once naming the first one's PID (the command line takes it
  before loading anything: `held_from_start`; the lock is re-entrant within a process);
- it checks `out` again under the lock (`check_out`: never an input, never a mount point, never a non-empty
  directory without `overwrite`, and `overwrite` only replaces an earlier output);
- it writes into a hidden directory next to `out`, renamed to `out` when complete: `.NAME.partial-<run
  key>` for a resumable run (named by a hash of everything that decides the output, kept when the run is
  interrupted or fails so that the same command, with or without `overwrite`, resumes from it), or
  `.NAME.partial-staged`, removed on failure;
- a full disk removes the partial directory (nothing half-written keeps the disk full), a bad input found
  mid-run removes a resumable one (it would fail the same way again), and a successful run removes the
  stale partial state other runs left for the same `out`.
Nothing is ever removed by its name alone: every directory a run stages (and an earlier output it moves
aside) holds a marker file naming the run's `out` and the directory itself (`MARKER`), and only a
directory holding one is removed or reused; a directory of the same name without one is the user's, and
the run is refused in one line before it would touch it. A lock file is truncated and removed only when
it holds a PID and nothing else.
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
import secrets
import shutil
import stat
import time
from collections.abc import Iterator

from ..errors import UsageError
from .places import MARKER, check_out, target

log = logging.getLogger("unipruning")

STAGED = "staged"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_LOCK_TEXT = re.compile(rb"^\d*\n?$")  # a lock file holds its holder's PID (or nothing yet)


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
    lock): `check_out`, a writable place, no directory of the user's where the run would stage, and
    (`lock`) that no other run holds the lock. Writes nothing."""
    check_out(out, overwrite, sources)
    _check_writable(out)
    check_staging_place(out)
    if lock:
        probe_lock(out)


# ------------------------------------------------------------------------------------------ the lock
_HELD: set[str] = set()  # the lock files this process holds


def lock_path(out: str) -> str:
    path = target(out)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")


def _read_small(path: str, limit: int = 4096) -> bytes:
    """The first `limit` bytes of a file, never blocking (a FIFO or device gives what it has, or nothing)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return os.read(fd, limit) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    finally:
        os.close(fd)


def _check_lock_file(out: str, path: str) -> None:
    """A lock file is ours to truncate and remove only when it is a regular file holding a PID (or nothing:
    a run killed as it opened it); anything else of that name is the user's."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    ours = stat.S_ISREG(st.st_mode) and st.st_size <= 32
    with contextlib.suppress(OSError):
        ours = ours and bool(_LOCK_TEXT.match(_read_small(path, 33)))
    if not ours:
        raise UsageError(f"`out` {out!r}: {path} exists and is not a unipruning lock file (a PID): it is not ours "
                         "to replace; move it away or choose another `out`")


def _busy(out: str, path: str) -> UsageError:
    pid = ""
    for _ in range(10):  # the holder writes its PID right after taking the lock
        with contextlib.suppress(OSError):
            pid = _read_small(path, 32).decode(errors="replace").strip()
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
    if path in _HELD:
        return
    _check_lock_file(out, path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # no lock file: nobody holds it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(out, path) from None
    finally:
        os.close(fd)


def _acquire(out: str, path: str, wait: bool) -> int:
    while True:
        _check_lock_file(out, path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        if not _try_lock(fd, wait):
            os.close(fd)
            raise _busy(out, path)
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the holder removed the file as we opened it: lock the current one


@contextlib.contextmanager
def out_lock(out: str, wait: bool = False) -> Iterator[None]:
    """Hold the advisory lock of `out` (its file holds our PID; removed on release). Another holder:
    a one-line error naming its PID, or, with `wait`, wait for it. Held already by this process: nothing
    more to do (the command line takes it before the job does)."""
    path = lock_path(out)
    if path in _HELD:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = _acquire(out, path, wait)
    _HELD.add(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        _HELD.discard(path)
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)


@contextlib.contextmanager
def held_from_start(out) -> Iterator[None]:
    """The lock of `out` taken before a command loads anything, so that a second run into it is refused at
    once; only where the directory it lives in exists (nothing is created before the checks of `out`)."""
    usable = isinstance(out, (str, os.PathLike)) and os.fspath(out)
    if not usable or not os.path.isdir(os.path.dirname(lock_path(out))):
        yield
        return
    with out_lock(out):
        yield


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


def _mark(directory: str, out: str, run: str) -> None:
    """Write the marker that makes `directory` provably ours: it names `out` and the directory itself."""
    write_json(os.path.join(directory, MARKER), {"unipruning": "staging", "out": os.path.basename(target(out)),
                                                 "directory": os.path.basename(directory), "run": run,
                                                 "pid": os.getpid()})


def made_by_us(directory: str, out: str) -> bool:
    """Whether `directory` is one a run of ours staged (or moved aside) for `out`: a directory, not a link,
    holding our marker, which names `out` and this very directory (a copy under another name is not ours)."""
    path = os.path.join(directory, MARKER)
    try:
        if not (stat.S_ISDIR(os.lstat(directory).st_mode) and stat.S_ISREG(os.lstat(path).st_mode)):
            return False
        marker = json.loads(_read_small(path))
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("unipruning") == "staging"
            and marker.get("out") == os.path.basename(target(out))
            and marker.get("directory") == os.path.basename(directory))


def _not_ours(directory: str, out: str) -> UsageError:
    return UsageError(f"`out` {out!r}: {directory} exists but no unipruning run made it (it holds no {MARKER} "
                      "naming it): it may be yours, so it is left as it is; move it away or choose another `out`")


def check_staging_place(out: str) -> None:
    """Refuse, before any work, a directory of the user's where the run would stage (`.NAME.partial-staged`
    without our marker); a resumable run's own directory is checked when its name is known."""
    staged = _sibling(out, f"partial-{STAGED}")
    if os.path.lexists(staged) and not made_by_us(staged, out):
        raise _not_ours(staged, out)


def _commit(tmp: str, out: str) -> None:
    """Replace `out` by `tmp` in one rename (the old `out`, if any, is moved aside first, marked as ours and
    removed only after; put back if the rename fails): the directory appears complete or not at all."""
    old = None
    if os.path.exists(out):
        old = _sibling(out, f"old-{secrets.token_hex(4)}")
        os.rename(out, old)
        with contextlib.suppress(OSError):  # unmarked, a killed run's old output is left, never removed
            _mark(old, out, "replaced")
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out, MARKER))
        raise
    with contextlib.suppress(OSError):
        os.remove(os.path.join(out, MARKER))
    _fsync_directory(os.path.dirname(out))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ordinary_directory(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)  # an ordinary directory, whatever made it


def remove_stale(out: str) -> None:
    """Remove the partial state that earlier runs left for `out` (a successful run has replaced what they
    were writing): only directories holding our marker for `out`; each one is named with its size on
    stderr. A directory of the same name pattern without one is the user's and is left alone."""
    path = target(out)
    prefix, parent = f".{os.path.basename(path)}.", os.path.dirname(path)
    for entry in sorted(os.listdir(parent)):
        full = os.path.join(parent, entry)
        if not entry.startswith((prefix + "partial-", prefix + "old-")):
            continue
        if not made_by_us(full, out):
            log.debug("left %s: no unipruning run made it", full)
            continue
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
    `run_key` it is `.NAME.partial-staged` (emptied first when it holds our marker: the caller holds the
    lock, so it is a killed run's), removed on failure. With one it is named by `run_key` (a hash of
    everything that decides the output) and kept when the run stops, so that the same command finds it
    again and resumes (see `_stopped` for when it is not). A directory of that name without our marker is
    refused, never emptied or reused."""
    out = target(out)
    keep = run_key is not None
    tmp = partial_directory(out, run_key) if keep else _sibling(out, f"partial-{STAGED}")
    if os.path.lexists(tmp) and not made_by_us(tmp, out):
        raise _not_ours(tmp, out)
    if not keep and os.path.lexists(tmp):
        shutil.rmtree(tmp)
    _ordinary_directory(tmp)
    try:
        _mark(tmp, out, run_key or STAGED)
        yield tmp
        _commit(tmp, out)
    except BaseException as exc:
        raised = _stopped(exc, tmp, keep)
        if raised is exc:
            raise
        raise raised from exc


@contextlib.contextmanager
def writing(out: str, overwrite: bool, sources: dict[str, str | None], run_key: str | None = None) -> Iterator[str]:
    """The staging directory of a job writing `out` (resumable when `run_key` is given), under the lock
    of `out`, with `out` checked again under it; success removes the stale partial directories."""
    with out_lock(out):
        check_out(out, overwrite, sources)
        check_staging_place(out)
        with staged_directory(out, run_key) as staging:
            yield staging
        remove_stale(out)
