"""Where a run may write: `--out` checked against everything the run reads, and against its place.

Paths lie: a symbolic link at any depth of an input directory, or a bind mount of the same directory
under another name, makes two different paths one file. So inputs and `out` are compared by what
the kernel says they are, (st_dev, st_ino), not by their names:
- `out` must not be an input, nor lie inside one (its own directory and every directory above it are
  compared with each input directory);
- `out` must not hold an input: the directories above each input, and above the target of every
  symbolic link inside an input directory, are compared with `out`; and when `--overwrite` would
  replace an earlier output, every entry under `out` is compared with every file an input reads;
- `out` must not be a mount point (a container volume, a bind mount): a run writes beside `out` and
  renames the finished directory into place, which a mount point refuses, so it is refused before any
  work, with the way out (a directory inside it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ..errors import UsageError

# what prune/mask, pack and pack --format fp8-2:4 write last
OUTPUT_MARKERS = ("pruning_report.json", "packing_report.json", "fp8_24_report.json")
MOUNTINFO = "/proc/self/mountinfo"
MARKER = ".unipruning-staging"  # the file inside every directory a run stages (io/staging.py)

FileId = tuple[int, int]


def target(out: str) -> str:
    """The directory a run writes for `out`: its absolute path, or where it points when it is a link."""
    return os.path.realpath(out) if os.path.islink(out) else os.path.abspath(out)


def _file_id(path: str, follow: bool = True) -> FileId | None:
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def ids_up(path: str) -> list[FileId]:
    """(st_dev, st_ino) of `path` (or its nearest existing part) and of every directory above it."""
    path = os.path.realpath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    found = []
    while True:
        if (fid := _file_id(path)) is not None:
            found.append(fid)
        parent = os.path.dirname(path)
        if parent == path:
            return found
        path = parent


def _entries(path: str) -> Iterator[str]:
    """Every entry under a directory, at any depth (links listed, not descended: the readers do not
    descend them either)."""
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            yield os.path.join(root, name)


def _links(path: str) -> Iterator[str]:
    if os.path.isdir(path):
        yield from (entry for entry in _entries(path) if os.path.islink(entry))


def _read_ids(path: str) -> dict[FileId, str]:
    """{(st_dev, st_ino): path} of everything reading `path` may read: itself and, for a directory, every
    entry at any depth, links followed to what they point to."""
    found = {}
    for entry in [path, *(_entries(path) if os.path.isdir(path) else ())]:
        if (fid := _file_id(entry)) is not None:
            found.setdefault(fid, entry)
    return found


def is_output(directory: str) -> bool:
    """Whether `directory` is something unipruning wrote: a report at its top, or only such directories
    (the demo's outputs). A staging marker left by a run killed right after its final rename is ignored."""
    names = [n for n in os.listdir(directory) if n != MARKER]
    if any(name in names for name in OUTPUT_MARKERS):
        return True
    paths = [os.path.join(directory, name) for name in names]
    return bool(paths) and all(os.path.isdir(p) and not os.path.islink(p) and is_output(p) for p in paths)


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are written as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def mount_points() -> set[str]:
    """The mount points of this process's mount namespace (empty where /proc is not mounted)."""
    points = set()
    with contextlib.suppress(OSError), open(MOUNTINFO) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                points.add(_unescape(fields[4]))
    return points


def is_mount_point(path: str) -> bool:
    """A mount point: another filesystem than its parent's, or a bind mount of the same one."""
    real = os.path.realpath(path)
    return os.path.ismount(real) or real in mount_points()


def _refuse_inside(out: str, option: str, path: str) -> UsageError:
    return UsageError(f"`out` {out!r} must not be `{option}` {path!r} or inside it")


def _refuse_holding(out: str, option: str, path: str, found: str) -> UsageError:
    detail = "" if found == path else f" (its file {found})"
    return UsageError(f"`out` {out!r} contains `{option}` {path!r}{detail}: writing it would delete that input; "
                      "choose another `out`")


def check_not_input(out: str, overwrite: bool, sources: dict[str, str | None]) -> None:
    """Refuse an `out` that is, lies inside or holds one of the inputs ({parameter: path}; None and paths
    that do not exist are skipped), by (st_dev, st_ino): links at any depth and bind mounts included."""
    above_out = set(ids_up(target(out)))
    out_id = _file_id(target(out))
    for option, path in sources.items():
        if path is None or not os.path.exists(path):
            continue
        if _file_id(path) in above_out:
            raise _refuse_inside(out, option, path)
        if out_id is None:
            continue
        for place in [path, *_links(path)]:
            if out_id in ids_up(place):
                raise _refuse_holding(out, option, path, path if place == path else os.path.realpath(place))
    if out_id is not None and overwrite and os.path.isdir(out) and is_output(out):
        _check_out_holds_none(out, sources)


def _check_out_holds_none(out: str, sources: dict[str, str | None]) -> None:
    """Before `overwrite` replaces an earlier output: nothing under it is a file or directory an input
    reads (a bind mount inside an input directory reaches it under another name)."""
    inside = {fid for entry in _entries(target(out)) if (fid := _file_id(entry, follow=False)) is not None}
    for option, path in sources.items():
        if path is None or not os.path.exists(path):
            continue
        for fid, entry in _read_ids(path).items():
            if fid in inside:
                raise _refuse_holding(out, option, path, entry)


def check_place(out: str) -> None:
    """`out` can become a directory: not a dangling link, its existing parent a directory, and itself not
    a mount point (the finished output is renamed into place)."""
    if os.path.islink(out) and not os.path.exists(out):
        raise UsageError(f"`out` {out!r} is a symbolic link to {os.readlink(out)!r}, which does not exist: "
                         "create its target or pass another `out`")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"`out` {out!r}: {parent!r} is not a directory")
    if os.path.isdir(out) and is_mount_point(out):
        raise UsageError(f"`out` {out!r} is a mount point (another filesystem, or a bind mount): a run writes "
                         "beside `out` and renames the finished directory into place, which a mount point does not "
                         f"allow; pass a directory inside it, e.g. {os.path.join(out, 'pruned')!r}")


def check_out(out: str, overwrite: bool, sources: dict[str, str | None]) -> None:
    """Refuse an `out` that would lose or clobber data: empty, equal to / inside / holding one of the inputs,
    a mount point, a file, a dangling link, non-empty without overwrite, or, with overwrite, a non-empty
    directory that is not an earlier output."""
    if not isinstance(out, (str, os.PathLike)):
        raise UsageError(f"`out`: expected a directory path, got {type(out).__name__} {out!r:.100}")
    if not os.fspath(out):  # "" is the working directory to os.path.abspath, and exists() says False: refused
        raise UsageError("`out`: expected a directory path, got an empty string")
    out = os.fspath(out)
    check_not_input(out, overwrite, sources)
    check_place(out)
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise UsageError(f"`out` {out!r} exists and is not a directory")
    if os.listdir(out) and not overwrite:
        raise UsageError(f"`out` {out!r} is not empty (pass `overwrite` to replace it)")
    if os.listdir(out) and not is_output(out):
        raise UsageError(f"`out` {out!r} is not empty and is not an earlier unipruning output (no "
                         f"{' or '.join(OUTPUT_MARKERS)}): `overwrite` replaces only those; empty it yourself or "
                         "choose another `out`")
