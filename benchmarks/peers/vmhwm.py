"""Run a module or script in this process and record its own peak RSS (VmHWM) when it ends.

    python benchmarks/peers/vmhwm.py REPORT.json -m unipruning prune --model ...
    python benchmarks/peers/vmhwm.py REPORT.json path/to/script.py ARGS...

The parent cannot measure a child's peak memory with `ru_maxrss`: on Linux a forked child inherits the
parent's high-water mark, so a large parent hides a small child. VmHWM in /proc/self/status belongs to
this process's address space, which exec starts afresh; this wrapper is that process, and it writes
{"vmhwm_bytes", "vmrss_bytes", "exit_code", "seconds"} to REPORT.json however the target ends (return,
sys.exit, an exception), then exits with the target's code.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time


def proc_status_bytes(field: str, path: str = "/proc/self/status") -> int:
    """A `kB` field of /proc/<pid>/status (VmHWM, VmRSS), in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in {path}")


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)  # what SystemExit("message") prints when uncaught
    return 1


def run(report: str, target: list[str]) -> int:
    start = time.perf_counter()
    code = 1
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))
            runpy.run_path(target[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    finally:
        record = {"vmhwm_bytes": proc_status_bytes("VmHWM"), "vmrss_bytes": proc_status_bytes("VmRSS"),
                  "exit_code": code, "seconds": time.perf_counter() - start, "argv": target}
        with open(report, "w") as f:
            json.dump(record, f, indent=1)
    return code


if __name__ == "__main__":
    if len(sys.argv) < 3 or (sys.argv[2] == "-m" and len(sys.argv) < 4):
        print("usage: vmhwm.py REPORT.json (-m MODULE | SCRIPT) [ARGS...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(sys.argv[1], sys.argv[2:]))
