"""Hugging Face hub model ids (`meta-llama/Llama-2-7b-hf`) as local directories, through huggingface_hub's cache.

`resolve_model(name)` returns `name` itself when it is a local path, else the snapshot directory of the
hub repository in the hub's cache (`--cache-dir`, default HF_HUB_CACHE, ~/.cache/huggingface/hub), at
`--revision` (a branch, tag or commit; default main). Only what a job reads is downloaded: the
safetensors shards and the JSON, tokenizer, template and licence files (never .bin/.pt duplicates nor
an `original/` folder). The snapshot's files are the cache's own (symlinks to its blobs), so streaming
reads the shards in place: nothing is copied.

When the hub is unreachable (offline.py: HF_HUB_OFFLINE set, or its endpoint not answering) the cache
alone serves the id; a model that is not cached is one line that says so and how to pass a local
directory.
"""

from __future__ import annotations

import fnmatch
import os
import re

from .. import offline
from ..errors import UsageError

# org/name, as the hub spells repository ids (a local path that exists always wins)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
TOKENIZER_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
MODEL_FILES = [*TOKENIZER_FILES, "*.safetensors", "*.py", "LICENSE*", "USE_POLICY*", "*.md"]
IGNORED = ["*/*"]  # top-level files only (what from_pretrained and our reader look at; not e.g. original/)


def is_hub_id(name: str) -> bool:
    """Whether `name` is read as a hub repository id: org/name, and no such local path."""
    return not os.path.exists(name) and HUB_ID.match(name) is not None


def cache_root(cache_dir: str | None) -> str:
    from huggingface_hub import constants

    return cache_dir or constants.HF_HUB_CACHE


def resolve_model(name: str, option: str = "model_dir", revision: str | None = None,
                  cache_dir: str | None = None, files: list[str] | None = None) -> str:
    """The local directory of `name`: itself when it is a local path (or not a hub id: the job's own
    checks then word the error), else the snapshot of hub repository `name` at `revision`, downloaded
    into `cache_dir` when the hub is reachable. `option` is the parameter that named it (messages);
    `files`: the patterns fetched (default MODEL_FILES)."""
    if not is_hub_id(name):
        if revision is not None and os.path.exists(name):
            raise UsageError(f"`revision` applies to hub ids; {name!r} is a local directory")
        return name
    from huggingface_hub import snapshot_download

    reason = offline.offline_reason()
    try:
        path = snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=files or MODEL_FILES,
                                 ignore_patterns=IGNORED, local_files_only=reason is not None)
    except Exception as exc:  # noqa: BLE001 - each hub failure becomes one line (_hub_error)
        raise _hub_error(exc, name, option, revision, cache_dir, reason) from None
    if files is None and not any(fnmatch.fnmatch(f, "*.safetensors") for f in os.listdir(path)):
        where = "its cached snapshot" if reason is not None else "the hub repository"
        raise UsageError(f"`{option}`: {where} of {name!r} ({path}) has no safetensors weights"
                         + (f"; the hub is unreachable ({reason}), so only the cache was read" if reason else
                            " (only .bin weights? convert them with save_pretrained)"))
    return path


def _hub_error(exc: Exception, name: str, option: str, revision: str | None, cache_dir: str | None,
               reason: str | None) -> UsageError:
    """The one-line UsageError for a failed snapshot_download."""
    from huggingface_hub import errors

    at = f" at revision {revision!r}" if revision else ""
    local = "pass a local model directory instead"
    if reason is not None or isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        why = reason or f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
        return UsageError(f"`{option}`: {name!r}{at} is not in the hub cache ({cache_root(cache_dir)}) and the hub is "
                          f"unreachable ({why}): {local}, or fetch it where the hub is reachable "
                          f"(`hf download {name}`) and point `cache_dir` at that cache")
    if isinstance(exc, errors.GatedRepoError):
        return UsageError(f"`{option}`: {name!r} is gated: accept its licence on the hub and log in (`hf auth login`), "
                          f"or {local}")
    if isinstance(exc, errors.RevisionNotFoundError):
        return UsageError(f"`revision`: {name!r} has no revision {revision!r}")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return UsageError(f"`{option}`: {name!r} is neither a local directory nor a hub model you can access "
                          "(a typo, or private: log in with `hf auth login`)")
    return UsageError(f"`{option}`: downloading {name!r}{at} failed ({type(exc).__name__}: "
                      f"{(str(exc).splitlines() or [''])[0][:160]})")
