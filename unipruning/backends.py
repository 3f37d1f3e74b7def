"""Backend registry: which implementations of the kernels exist and which can run here.

`torch` (kernels/torch_backend.py: the twins of kernels/reference.py) runs everywhere. `triton`
(kernels/triton_backend.py) runs on a CUDA device, or on the CPU under the Triton interpreter when
TRITON_INTERPRET=1 is set in the environment (slow: for tests; the library never sets it). There are no
calibration kernels in CUDA C++: the CUDA extension unipruning._C only packs 2:4 weights
(unipruning/packing/). `auto` picks triton for tensors on a GPU and torch otherwise, falling back
silently (one debug log line); an explicit request that cannot be met raises with the reason. Importing
this module never initialises CUDA: availability is checked when a backend is resolved. Beside it, where
a job computes (`resolve_device`, `resolve_dtype`).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch

from .errors import UsageError

log = logging.getLogger("unipruning")

BACKEND_ENV = "UNIPRUNING_BACKEND"
NAMES = ("torch", "triton")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_importable() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - absent or broken install
        return False, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    if _interpreting():
        import numpy

        if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
            return False, (f"the Triton interpreter of this triton needs numpy < 2.4 (numpy {numpy.__version__} "
                           "rejects its 1-element scalars)")
    return True, ""


def available(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """{backend: (usable, reason)} for tensors on `device` (None: the best device here)."""
    device = torch.device(device) if device is not None else None
    status = {"torch": (True, "reference torch implementation, any device")}
    ok, reason = _triton_importable()
    if ok:
        on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if on_gpu:
            status["triton"] = (True, "compiled Triton kernels on the GPU")
        elif _interpreting():
            status["triton"] = (True, "Triton interpreter on the CPU (TRITON_INTERPRET=1; slow, for testing)")
        else:
            status["triton"] = (False, "needs a CUDA device (or TRITON_INTERPRET=1 to interpret on the CPU)")
    else:
        status["triton"] = (False, reason)
    return status


def resolve(requested: str | None = None, device: torch.device | str | None = None) -> str:
    """The backend for tensors on `device`: an explicit request, else $UNIPRUNING_BACKEND, else auto."""
    name = requested if requested not in (None, "auto") else os.environ.get(BACKEND_ENV) or "auto"
    status = available(device)
    if name == "auto":
        on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        if on_gpu and status["triton"][0]:
            return "triton"
        if on_gpu:
            log.debug("backend triton skipped: %s", status["triton"][1])
        return "torch"
    if name not in status:
        raise UsageError(f"`backend`: expected one of auto, {', '.join(NAMES)}, got {name!r}")
    ok, reason = status[name]
    if not ok:
        raise UsageError(f"`backend` {name} cannot run here: {reason}")
    return name


@functools.cache
def implementation(name: str) -> ModuleType:
    """The module holding backend `name`'s kernels under their twins' names."""
    module = {"torch": "unipruning.kernels.torch_backend", "triton": "unipruning.kernels.triton_backend"}[name]
    return importlib.import_module(module)


def resolve_device(name: str) -> torch.device:
    """`device` auto: cuda when a GPU is present, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("`device` cuda: no CUDA device is available here")
    return torch.device(name)


def resolve_dtype(name: str, config, device: torch.device) -> torch.dtype:
    """`dtype` auto: the checkpoint's dtype on a GPU, float32 on a CPU (half-precision CPU matmuls are
    slow and, for float16, lossy)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32
