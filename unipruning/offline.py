"""Whether the Hugging Face hub can be reached, asked once per process and answered in a second or two.

Model ids (io/hub.py) and the hub's text sources (data.py: c4, wikitext2) need the hub. Offline, the
libraries behind them wait and retry (datasets: about 30 s, then a 55-line ConnectionError), so both ask
here first: with HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) set, or when one HEAD request to the hub's
endpoint fails within PROBE_TIMEOUT seconds, they serve what is cached and otherwise say in one line
that the hub is unreachable and how to pass a local directory instead.
"""

from __future__ import annotations

import os

PROBE_TIMEOUT = 3.0  # seconds: a reachable hub answers a HEAD well within this
_TRUE = ("1", "on", "yes", "true")
_answer: list[str | None] = []  # the probe's answer, once per process


def offline_env() -> str | None:
    """The environment variable that puts the hub libraries offline, if one is set."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def offline_reason(timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the hub answers; otherwise why not, in a few words ("HF_HUB_OFFLINE is set", "the hub
    did not answer (ConnectError: ...)"). The probe runs once per process; the environment is read
    every time."""
    name = offline_env()
    if name is not None:
        return f"{name} is set"
    if not _answer:
        _answer.append(_probe(timeout))
    return _answer[0]


def _probe(timeout: float) -> str | None:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any failure to connect means unreachable
        first = (str(exc).splitlines() or [""])[0][:120]
        return f"{constants.ENDPOINT} did not answer ({type(exc).__name__}: {first})"
    return None


def forget() -> None:
    """Ask the hub again at the next `offline_reason` (tests; a long-running process)."""
    _answer.clear()
