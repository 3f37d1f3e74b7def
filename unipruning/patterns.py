"""The user's regular expressions (--targets, --ignore, a recipe's patterns): compiled with one-line errors,
and matched against the matrix names in a child process under a time and memory bound.

Python's `re` backtracks: a nested repeat such as `(.+)+Z` takes minutes on one matrix name, a run of
unbounded repeats (`.*.*.*.*.*.*Z`) grows as a power of the name's length, and while `re` matches it
looks at no signal, so Ctrl-C waits for it. Refusing such patterns by their shape cannot be complete, and
the `regex` package (which has a timeout) expands bounded repeats when it compiles, so that
`((a{1000}){1000}){1000}` exhausts the memory before any timeout applies. So every pattern of a run is
matched once, with `re` itself (the semantics the README promises), in a small child interpreter (`-I -S`:
the standard library only, about 20 ms of CPU) that is killed past MATCH_SECONDS or MATCH_BYTES of memory;
the parent waits in an interruptible call, so Ctrl-C stops both at once. Without patterns nothing starts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterable

from .errors import UsageError

MATCH_SECONDS = 5.0  # every pattern of a run against every name (a real run needs milliseconds)
MATCH_BYTES = 1 << 30  # address space of the child (an interpreter alone takes about 30 MB)
SEARCH, MATCH = "search", "match"  # re.search (ours) or re.match (compressed-tensors' "re:" targets)

# the child: the patterns' match lists, the index of each pattern printed to stderr before it is tried
# (so that the parent can name the pattern that ran out of time or memory)
_CHILD = """
import json, re, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
job = json.load(sys.stdin)
found = []
for i, (how, text, flags) in enumerate(job["patterns"]):
    print(i, file=sys.stderr, flush=True)
    test = getattr(re.compile(text, flags), how)
    found.append([j for j, name in enumerate(job["names"]) if test(name)])
json.dump(found, sys.stdout)
"""


def compile_pattern(option: str, text) -> re.Pattern:
    """`text` compiled by `re`, or a one-line UsageError naming `option` (not a string, bad syntax, a repeat
    count too large)."""
    if not isinstance(text, str):
        raise UsageError(f"{option}: {text!r} is not a regular expression (expected a string)")
    try:
        return re.compile(text)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise UsageError(f"{option}: {text!r} is not a valid regular expression ({exc})") from None


Key = tuple[str, str, int]  # (SEARCH or MATCH, the pattern's text, its flags)


class Matches:
    """Which of `names` each pattern finds: {(how, text, flags): option for messages} are matched all at
    once, bounded; `found(how, text, flags, name)` then says whether one found a name."""

    def __init__(self, patterns: dict[Key, str], names: Iterable[str]):
        self.names = list(dict.fromkeys(names))
        self.patterns = patterns
        self._found = self._run() if patterns else {}

    def __call__(self, how: str, text: str, flags: int, name: str) -> bool:
        return name in self._found[(how, text, flags)]

    def _run(self) -> dict[Key, set[str]]:
        keys = list(self.patterns)
        job = json.dumps({"patterns": keys, "names": self.names})
        child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD.format(limit=MATCH_BYTES)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = _communicate(child, job, MATCH_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
            raise self._refused(keys, err, f"takes more than {MATCH_SECONDS:g} s to match the matrix names "
                                "(catastrophic backtracking: nested or repeated unbounded repeats such as "
                                "(.+)+ or .*.*.*); simplify it") from None
        except BaseException:  # Ctrl-C: the child goes with us
            child.kill()
            child.wait()
            raise
        if child.returncode != 0 and "MemoryError" in err:
            raise self._refused(keys, err, f"cannot be matched within {MATCH_BYTES >> 20} MiB of memory; "
                                "simplify it")
        if child.returncode != 0:
            raise RuntimeError(f"matching the regular expressions failed: {(err.strip().splitlines() or [''])[-1]}")
        return {key: {self.names[j] for j in hits} for key, hits in zip(keys, json.loads(out), strict=True)}

    def _refused(self, keys: list[Key], err: str, why: str) -> UsageError:
        started = [int(line) for line in err.splitlines() if line.strip().isdigit()]
        key = keys[started[-1] if started else 0]
        return UsageError(f"{self.patterns[key]}: {key[1]!r} {why}")


def _communicate(child: subprocess.Popen, job: str, seconds: float) -> tuple[str, str]:
    """child.communicate(job, timeout=seconds) in slices of 0.1 s: a Ctrl-C that the kernel hands to another
    thread of the process (a progress heartbeat, a library's worker) does not interrupt the main thread's wait,
    whose handler then runs only when the wait returns; a short slice bounds that delay."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return child.communicate(job, timeout=max(0.0, min(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise
            job = None  # sent with the first slice; communicate() keeps sending it
