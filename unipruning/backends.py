"""Backend registry: which implementations of the kernels exist and which can run here.

`torch` (kernels/reference.py) runs everywhere. `triton` and `cuda` are registered but not implemented
in this version: asking for one explicitly raises with that reason; `auto` falls back to torch with one
debug log line. Importing this module never initialises CUDA.
"""

from __future__ import annotations

import logging
import os

from .errors import UsageError

log = logging.getLogger("unipruning")

BACKEND_ENV = "UNIPRUNING_BACKEND"
_NOT_IMPLEMENTED = {
    "triton": "the fused Triton kernels are not implemented in this version",
    "cuda": "the CUDA extension (unipruning._C) is not implemented in this version",
}


def available() -> dict[str, tuple[bool, str]]:
    """{backend: (usable, reason)} for every registered backend."""
    status = {"torch": (True, "reference torch implementation")}
    for name, reason in _NOT_IMPLEMENTED.items():
        status[name] = (False, reason)
    return status


def resolve(requested: str | None = None) -> str:
    """The backend to use for a call: an explicit request, else $UNIPRUNING_BACKEND, else auto."""
    name = requested or os.environ.get(BACKEND_ENV) or "auto"
    status = available()
    if name == "auto":
        for candidate in ("triton", "torch"):
            ok, reason = status[candidate]
            if ok:
                return candidate
            log.debug("backend %s skipped: %s", candidate, reason)
    if name not in status:
        raise UsageError(f"--backend: expected one of auto, {', '.join(status)}, got {name!r}")
    ok, reason = status[name]
    if not ok:
        raise UsageError(f"--backend {name} cannot run here: {reason}")
    return name
