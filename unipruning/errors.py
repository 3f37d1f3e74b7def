"""The one exception type for bad input, and how the CLI words it.

Library code names the parameter at fault in backticks (`sparsity`, `model_dir`): that reads as
Python to a caller of the API, and the CLI rewrites each backticked parameter into the flag that sets
it (`cli_wording`), so one message serves both. The CLI prints a UsageError as a single line and exits
with code 2.
"""

from __future__ import annotations

import re

# parameters whose CLI flag is not simply --name-with-dashes
_FLAG_OF = {"model_dir": "--model", "saliency_dir": "--saliency", "tokenizer_dir": "--tokenizer",
            "offload": "--offload-activations", "bounds": "--bounds"}
_BACKTICKED = re.compile(r"`([a-z][a-z0-9_]*)`")


class UsageError(ValueError):
    """Bad input from the user (an argument, a file, a model): the message names the parameter."""


def flag_of(name: str) -> str:
    return _FLAG_OF.get(name, "--" + name.replace("_", "-"))


def cli_wording(message: str) -> str:
    """A library message with each `parameter` replaced by its CLI flag."""
    return _BACKTICKED.sub(lambda m: flag_of(m.group(1)), message)
