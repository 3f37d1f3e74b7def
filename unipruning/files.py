"""Reading the user's small files (config.json, indexes, recipes, calibration texts) so that no file can
hang or exhaust a run: regular files only (a FIFO or a device named like a text file would block or never
end), opened without blocking and checked on the open descriptor (no race with a swap), bounded in size,
and every failure one line with the operating system's own reason (permission denied is not "missing").
"""

from __future__ import annotations

import os
import stat

from .errors import UsageError


def is_regular(path: str) -> bool:
    """A regular file (links followed), without opening it: what a directory walk may read."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_regular(path: str, option: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file `path`, or a one-line UsageError naming `option`: not a regular file,
    larger than `limit` bytes, or unreadable (with the OS's reason)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"`{option}`: cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"`{option}`: {path} is not a regular file (a FIFO, device or socket): pass a file")
        if limit is not None and info.st_size > limit:
            raise UsageError(f"`{option}`: {path} is {info.st_size} bytes, more than a file of its kind can be "
                             f"({limit} bytes): it is not the file expected here")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read() if limit is None else f.read(limit + 1)[:limit]
    except OSError as exc:
        raise UsageError(f"`{option}`: cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def check_plain_files(directory: str, option: str, recursive: bool = False) -> None:
    """A model or tokenizer directory (or, `recursive`, a local copy of a dataset) holds files and
    directories: a FIFO, socket or device in it (what transformers or datasets would open and wait on
    forever) is refused, named."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise UsageError(f"`{option}`: cannot read {directory}: {exc.strerror}") from None
    if recursive:
        names = sorted(os.path.relpath(os.path.join(root, n), directory) for root, dirs, files in os.walk(directory)
                       for n in dirs + files)
    for name in names:
        path = os.path.join(directory, name)
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # a dangling link: whoever needs the file says it is missing
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UsageError(f"`{option}`: {path} is not a regular file (a FIFO, device or socket): remove it or "
                             "replace it with the file it stands for")
