"""Text sources -> token windows, for calibration and for perplexity.

A source is a hub name (`wikitext2`, `c4`: the standard loaders, not reachable on our machines), a
.txt file, a directory of .txt files (recursive, sorted), or a .jsonl file with a "text" field. Local
files go through `datasets`' own "text"/"json" loaders when `datasets` is installed (imported lazily),
else they are read directly; both give the same documents. Documents are joined with "\n\n".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from .errors import UsageError

log = logging.getLogger("unipruning")

HUB_SOURCES = ("wikitext2", "c4")
_C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
_C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"


def _local_files(path: str, option: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if name.endswith(".txt")
        )
        if not files:
            raise UsageError(f"`{option}`: directory {path!r} contains no .txt files")
        return files
    if os.path.isfile(path):
        if not path.endswith((".txt", ".jsonl")):
            raise UsageError(f"`{option}`: expected a .txt file, a .jsonl file or a directory, got {path!r}")
        return [path]
    raise UsageError(
        f"`{option}`: {path!r} is neither an existing file or directory nor one of {', '.join(HUB_SOURCES)}"
    )


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
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UsageError(f"`{option}`: cannot read {path}: {exc.strerror}") from None
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
        except ValueError as exc:
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


def _read_hub(name: str, split: str) -> list[str]:
    from datasets import load_dataset  # needs the network: untested on our machines

    if name == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test" if split == "eval" else "train")
        return list(ds["text"])  # wikitext's own line structure; joined below as the standard protocol does
    files = {"train": _C4_TRAIN} if split == "train" else {"validation": _C4_VALIDATION}
    ds = load_dataset("allenai/c4", data_files=files, split=next(iter(files)))
    return list(ds["text"][:1100]) if split == "eval" else list(ds["text"][:20000])


def read_documents(source: str, split: str = "train", option: str = "calib") -> list[str]:
    """The documents of a source (split 'train' for calibration, 'eval' for perplexity); `option` is the
    parameter that named it (for messages)."""
    if source in HUB_SOURCES:
        return _read_hub(source, split)
    docs = _read_local(_local_files(source, option), option)
    if not docs:
        raise UsageError(f"`{option}`: {source!r} contains no text")
    return docs


def tokenize(tokenizer, docs: list[str], separator: str = "\n\n") -> torch.Tensor:
    """One long (1, n) id tensor of the documents joined by `separator`."""
    ids = tokenizer(separator.join(docs), return_tensors="pt", verbose=False).input_ids
    return ids.reshape(1, -1)


def calibration_windows(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int, option: str = "calib"
) -> torch.Tensor:
    """(nsamples, seqlen) windows at seeded random offsets of the tokenized source."""
    if nsamples < 1 or seqlen < 2:
        raise UsageError(f"`{option}`: need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    ids = tokenize(tokenizer, read_documents(source, "train", option))[0]
    if ids.numel() < nsamples * seqlen:
        raise UsageError(
            f"`{option}`: {source!r} has {ids.numel()} tokens, fewer than nsamples x seqlen = "
            f"{nsamples} x {seqlen} = {nsamples * seqlen}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, source: str, seqlen: int, option: str = "data") -> torch.Tensor:
    """(n, seqlen) non-overlapping windows of the source (the standard perplexity protocol)."""
    if seqlen < 2:
        raise UsageError(f"`seqlen`: expected at least 2, got {seqlen}")
    ids = tokenize(tokenizer, read_documents(source, "eval", option))[0]
    count = ids.numel() // seqlen
    if count == 0:
        raise UsageError(f"`{option}`: {source!r} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].reshape(count, seqlen)


def windows_hash(windows: torch.Tensor) -> str:
    """sha256 of the token ids (int64, row-major): identifies a calibration set in the report."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
