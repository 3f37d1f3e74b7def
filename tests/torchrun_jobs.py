"""Several `unipruning` commands in one torchrun launch (tests/test_distributed.py): the processes start torch
and join their process group once, then run each command of the JSON list in argv[1] in turn; the exit code
is the first non-zero one."""

import json
import sys

from unipruning.cli import main

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        commands = json.load(f)
    for argv in commands:
        code = main(argv)
        if code:
            sys.exit(code)
