"""Text sources -> token windows, for calibration and for perplexity.

A source is a local path: a .txt file, a directory of .txt files (recursive, sorted), or a .jsonl file
with a "text" field, read through `datasets`' own "text"/"json" loaders when `datasets` is installed
(imported lazily), else directly (both give the same documents); their documents are joined with
"\n\n" and windows are drawn at seeded random offsets (calibration) or cut one after another (eval).

Or one of the papers' sources, `c4` and `wikitext2`, read from the Hugging Face hub (`c4:DIR`,
`wikitext2:DIR`: from a local copy of the hub repository laid out as on the hub), with the protocols of
Wanda (locuslab/wanda, lib/data.py) and SparseGPT (IST-DASLab/sparsegpt, datautils.py), so that
calibration windows and perplexities line up with theirs:
- c4 calibration: the shard en/c4-train.00000-of-01024.json.gz of allenai/c4; with Python's
  random.seed(seed), each window draws documents (randint(0, len - 1)) until one tokenizes to more than
  seqlen tokens (Wanda and SparseGPT's current code: `>`; an early SparseGPT revision had `>=`), then a
  window at randint(0, tokens - seqlen - 1) of that document;
- c4 validation: the first 1100 documents of en/c4-validation.00000-of-00008.json.gz joined with " ",
  tokenized once, the first 256 x seqlen tokens, in non-overlapping windows (256 of them);
- wikitext2 (wikitext, wikitext-2-raw-v1): calibration from the train split joined with " " at
  randint(0, tokens - seqlen - 1) offsets; perplexity on the test split joined with "\n\n".
The papers tokenize with the slow (sentencepiece) tokenizer (`use_fast=False`); we use the model's
AutoTokenizer, which transformers 5 provides as a fast tokenizer only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable

import torch

from . import offline
from .errors import UsageError
from .files import check_plain_files, is_regular, read_regular

log = logging.getLogger("unipruning")

HUB_SOURCES = ("wikitext2", "c4")
C4_REPO = "allenai/c4"
C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCUMENTS, C4_EVAL_WINDOWS = 1100, 256
WIKITEXT_REPO, WIKITEXT_CONFIG = "wikitext", "wikitext-2-raw-v1"
MAX_DRAWS = 100_000  # c4 calibration: documents drawn for one window before giving up (seqlen too long)
LOCAL_HINT = "pass local text instead (a .txt file, a directory of .txt files or a .jsonl with a 'text' field)"
# the papers cap nothing: Wanda sets seqlen = max_position_embeddings (2048 for LLaMA-1 and OPT, 4096 for
# Llama-2); SparseGPT 2048 for LLaMA and max_position_embeddings for OPT. Longer contexts are capped here.
SEQLEN_CAP, SEQLEN_FALLBACK = 4096, 2048
MAX_TEXT_BYTES = 256 << 20  # local text read for one run (wikitext2's test split: 1.3 MB; 128 x 4096 tokens: ~2 MB)


def packaged_text(plays: tuple[str, ...]) -> list[str]:
    """Shakespeare plays shipped inside the package (unipruning/_data: hamlet, macbeth, tempest,
    midsummer_nights_dream), one string each: the demo's texts, and the tests'."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_data")
    texts = []
    for play in plays:
        with open(os.path.join(root, f"{play}.txt"), encoding="utf-8") as f:
            texts.append(f.read())
    return texts


def model_context(config: dict) -> tuple[str, int] | None:
    """(config.json key, value) of a model's context length: max_position_embeddings (or n_positions, or
    its text_config's max_position_embeddings); None without one."""
    text = config.get("text_config")
    for key, value in (("max_position_embeddings", config.get("max_position_embeddings")),
                       ("n_positions", config.get("n_positions")),
                       ("text_config.max_position_embeddings",
                        text.get("max_position_embeddings") if isinstance(text, dict) else None)):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
            return key, value
    return None


def default_seqlen(config: dict) -> int:
    """The calibration and evaluation length the papers use for a model (see SEQLEN_CAP), from its
    config.json: its context (`model_context`), at most SEQLEN_CAP; SEQLEN_FALLBACK without one."""
    context = model_context(config)
    return SEQLEN_FALLBACK if context is None else min(context[1], SEQLEN_CAP)


def _local_files(path: str, option: str) -> list[str]:
    if os.path.isdir(path):
        named = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if name.endswith(".txt"))
        files = [f for f in named if is_regular(f)]  # a FIFO would block the run, a device never end
        if len(files) < len(named):
            kept = set(files)
            skipped = [f for f in named if f not in kept]
            log.warning("%s: skipped %d .txt entr%s that %s not a regular file: %s", option, len(skipped),
                        "y" if len(skipped) == 1 else "ies", "is" if len(skipped) == 1 else "are",
                        ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
        if not files:
            raise UsageError(f"`{option}`: directory {path!r} contains no .txt files")
        return files
    if os.path.exists(path) and not os.path.isdir(path) and not is_regular(path):
        raise UsageError(f"`{option}`: {path!r} is not a regular file (a FIFO, device or socket): pass a file")
    if os.path.isfile(path):
        if not path.endswith((".txt", ".jsonl")):
            raise UsageError(f"`{option}`: expected a .txt file, a .jsonl file or a directory, got {path!r}")
        return [path]
    raise UsageError(
        f"`{option}`: {path!r} is neither an existing file or directory nor one of {', '.join(HUB_SOURCES)} "
        "(or c4:DIR, wikitext2:DIR for a local copy of the hub's dataset)"
    )


def _check_size(files: list[str], source: str, option: str) -> None:
    """Local text is read whole and tokenized at once: more than MAX_TEXT_BYTES (far more than calibration or
    a perplexity needs) would take the memory of many times its size; refused before anything is read."""
    total = sum(os.stat(f).st_size for f in files)
    if total > MAX_TEXT_BYTES:
        raise UsageError(f"`{option}`: {source!r} holds {total / 2**20:.0f} MiB of text, more than the "
                         f"{MAX_TEXT_BYTES >> 20} MiB unipruning reads from local text (calibration needs nsamples x "
                         "seqlen tokens, a few MiB): pass a part of it")


def _read_local(files: list[str], option: str) -> list[str]:
    docs = _read_plain(files, option)  # every file checked first: bad bytes or lines are one line naming them
    try:
        import datasets  # noqa: F401  (lazy: heavy, and absent on some GPU images)
    except ImportError:
        log.debug("datasets not installed: reading %d local file(s) directly", len(files))
        return docs
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    try:
        if files[0].endswith(".jsonl"):
            ds = load_dataset("json", data_files=files, split="train")
        else:
            ds = load_dataset("text", data_files=files, sample_by="document", split="train")
        return [t for t in ds["text"] if t]
    except Exception as exc:  # noqa: BLE001 - e.g. a field of mixed types: the documents read directly are the same
        log.debug("datasets could not load %s (%s): using the documents read directly", files[0], exc)
        return docs


def _decoded(path: str, option: str) -> str:
    """The text of a file as Python's text mode reads it (UTF-8, universal newlines), or a one-line error."""
    raw = read_regular(path, option)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"`{option}`: {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): "
                         "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    if "\0" in text:
        raise UsageError(f"`{option}`: {path} contains NUL bytes: it is binary data, not text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_texts(path: str, text: str, option: str) -> list[str]:
    docs = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise UsageError(f"`{option}`: {path} line {n} is not valid JSON ({exc}): fix or remove it") from None
        if not isinstance(record, dict) or "text" not in record:
            raise UsageError(f"`{option}`: {path} line {n} has no 'text' field")
        if not isinstance(record["text"], str):
            raise UsageError(f"`{option}`: {path} line {n}: 'text' is {type(record['text']).__name__}, expected a "
                             "string")
        if record["text"]:
            docs.append(record["text"])
    return docs


def _read_plain(files: list[str], option: str) -> list[str]:
    docs = []
    for path in files:
        text = _decoded(path, option)
        if path.endswith(".jsonl"):
            docs.extend(_jsonl_texts(path, text, option))
        elif text:
            docs.append(text)
    return docs


def hub_source(source: str) -> tuple[str, str | None] | None:
    """(name, local copy or None) of a hub source: 'c4' -> ('c4', None), 'c4:DIR' -> ('c4', 'DIR'); None
    for a local path."""
    name, sep, root = source.partition(":")
    if name not in HUB_SOURCES or (sep and not root):
        return None
    if root and not os.path.isdir(root):
        raise UsageError(f"{source!r}: {root!r} is not a directory (expected a local copy of the hub's "
                         f"{C4_REPO if name == 'c4' else WIKITEXT_REPO} repository)")
    return name, root or None


def _load(name: str, root: str | None, split: str, option: str):
    """The `datasets` split of a hub source: the papers' own load_dataset call, or the same files of a
    local copy. Offline (offline.py) only the cache serves it, and a miss is one line."""
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    if root is not None:
        check_plain_files(root, option, recursive=True)
    reason = None if root else offline.offline_reason()
    if reason is not None and offline.offline_env() is None:  # datasets would retry for ~30 s
        raise _unreachable(name, option, reason)
    if name == "c4":
        files = {"train": C4_TRAIN} if split == "train" else {"validation": C4_VALIDATION}
        args, kwargs = (root or C4_REPO,), {"data_files": files, "split": next(iter(files))}
    elif root is None:
        args, kwargs = (WIKITEXT_REPO, WIKITEXT_CONFIG), {"split": "train" if split == "train" else "test"}
    else:
        part = "train" if split == "train" else "test"
        args, kwargs = (root,), {"data_files": {part: f"{WIKITEXT_CONFIG}/{part}-*.parquet"}, "split": part}
    try:
        return load_dataset(*args, **kwargs)
    except (ConnectionError, FileNotFoundError) as exc:  # datasets' words for "not reachable, not cached"
        if root is not None:
            raise UsageError(f"`{option}`: {name}:{root} does not hold the files of {kwargs['data_files']} "
                             f"({(str(exc).splitlines() or [''])[0][:160]})") from None
        raise _unreachable(name, option, reason or (str(exc).splitlines() or [""])[0][:160]) from None


def _unreachable(name: str, option: str, reason: str) -> UsageError:
    repo = C4_REPO if name == "c4" else WIKITEXT_REPO
    return UsageError(f"`{option}` {name} is read from the Hugging Face hub ({repo}), which is unreachable ({reason}) "
                      f"and has no cached copy here: {LOCAL_HINT}, or a local copy of the repository as "
                      f"`{option}` {name}:DIR")


def read_documents(source: str, split: str = "train", option: str = "calib") -> list[str]:
    """The documents of a source (split 'train' for calibration, 'eval' for perplexity); `option` is the
    parameter that named it (for messages). For hub sources: every document of the split the papers
    read (c4 eval: its first 1100)."""
    hub = hub_source(source)
    if hub is not None:
        ds = _load(*hub, split, option)
        texts = ds["text"] if hub[0] == "wikitext2" or split == "train" else ds[:C4_EVAL_DOCUMENTS]["text"]
        return list(texts)
    files = _local_files(source, option)
    _check_size(files, source, option)
    docs = _read_local(files, option)
    if not docs:
        raise UsageError(f"`{option}`: {source!r} contains no text")
    if not any(doc.strip() for doc in docs):
        raise UsageError(f"`{option}`: {source!r} contains only whitespace, no text")
    return docs


def tokenize(tokenizer, docs: list[str], separator: str = "\n\n") -> torch.Tensor:
    """One long (1, n) id tensor of the documents joined by `separator`."""
    ids = tokenizer(separator.join(docs), return_tensors="pt", verbose=False).input_ids
    return ids.reshape(1, -1)


def _check_sizes(nsamples: int, seqlen: int, option: str) -> None:
    if nsamples < 1 or seqlen < 2:
        raise UsageError(f"`{option}`: need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")


def calibration_windows(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int, option: str = "calib"
) -> torch.Tensor:
    """(nsamples, seqlen) calibration windows: for c4 and wikitext2 drawn as Wanda and SparseGPT draw
    them (module docstring); for local text at seeded random offsets of the documents joined by "\n\n"."""
    _check_sizes(nsamples, seqlen, option)
    hub = hub_source(source)
    if hub is not None and hub[0] == "c4":
        ds = _load(*hub, "train", option)
        return c4_windows(tokenizer, lambda i: ds[i]["text"], len(ds), nsamples, seqlen, seed, option)
    if hub is not None:  # wikitext2: the train split joined with " ", windows at Python-random offsets
        ids = tokenize(tokenizer, read_documents(source, "train", option), " ")[0]
        _check_tokens(ids, nsamples, seqlen, source, option, spare=1)
        rng = random.Random(seed)
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
        return torch.stack([ids[s : s + seqlen] for s in starts])
    ids = tokenize(tokenizer, read_documents(source, "train", option))[0]
    _check_tokens(ids, nsamples, seqlen, source, option)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _check_tokens(ids: torch.Tensor, nsamples: int, seqlen: int, source: str, option: str, spare: int = 0) -> None:
    """Enough tokens for the windows (`spare` more: the papers' offsets leave one token unused)."""
    if ids.numel() < max(nsamples * seqlen, seqlen + spare):
        raise UsageError(
            f"`{option}`: {source!r} has {ids.numel()} tokens, fewer than nsamples x seqlen = "
            f"{nsamples} x {seqlen} = {nsamples * seqlen}"
        )


def c4_windows(tokenizer, document: Callable[[int], str], count: int, nsamples: int, seqlen: int, seed: int,
               option: str = "calib") -> torch.Tensor:
    """Wanda's and SparseGPT's c4 calibration windows from `count` documents (`document(i)`): Python's
    random seeded with `seed`; per window, documents drawn at randint(0, count - 1) until one has more
    than seqlen tokens, then the window at randint(0, tokens - seqlen - 1) of it."""
    rng, windows = random.Random(seed), []
    for _ in range(nsamples):
        for _draw in range(MAX_DRAWS):
            ids = tokenizer(document(rng.randint(0, count - 1)), return_tensors="pt", verbose=False).input_ids[0]
            if ids.numel() > seqlen:
                break
        else:
            raise UsageError(f"`{option}`: no document of more than {seqlen} tokens in {MAX_DRAWS} draws "
                             "(a shorter `seqlen`?)")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def eval_windows(tokenizer, source: str, seqlen: int, option: str = "data") -> torch.Tensor:
    """(n, seqlen) non-overlapping windows of the source (the standard perplexity protocol): local text
    and wikitext2 joined with "\n\n"; c4 as Wanda and SparseGPT evaluate it (its first 1100 validation
    documents joined with " ", the first 256 x seqlen tokens)."""
    if seqlen < 2:
        raise UsageError(f"`seqlen`: expected at least 2, got {seqlen}")
    hub = hub_source(source)
    c4 = hub is not None and hub[0] == "c4"
    ids = tokenize(tokenizer, read_documents(source, "eval", option), " " if c4 else "\n\n")[0]
    if c4:
        ids = ids[: C4_EVAL_WINDOWS * seqlen]
    count = ids.numel() // seqlen
    if count == 0:
        raise UsageError(f"`{option}`: {source!r} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].reshape(count, seqlen)


def check_window_ids(windows: torch.Tensor, vocab: int, option: str = "calibration_batches") -> None:
    """Token ids the model's embedding has: in [0, vocab) (an id beyond it is an IndexError deep inside the
    forward), on a device with data."""
    if windows.is_meta:
        raise UsageError(f"`{option}`: the token ids are on the meta device (no data)")
    if windows.numel() and (int(windows.min()) < 0 or (vocab and int(windows.max()) >= vocab)):
        raise UsageError(f"`{option}`: token ids must lie in [0, {vocab}) (the model's vocab_size), got ids from "
                         f"{int(windows.min())} to {int(windows.max())}")


def windows_hash(windows: torch.Tensor) -> str:
    """sha256 of the token ids (int64, row-major): identifies a calibration set in the report."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
