"""What every CLI call pays before it does anything: the start-up of `unipruning --help`, side by side with a
bare interpreter and with `import torch` (which the package itself no longer imports: tests/test_lean_import.py).

    python benchmarks/bench_import.py [--repeat 5]     # best of --repeat fresh interpreters each

Prints the best wall time of each and writes nothing: start-up depends on the disk cache and the machine's
load, so the figures are compared within one run, not across runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CASES = {
    "python (bare interpreter)": "pass",
    "import torch": "import torch",
    "import unipruning": "import unipruning",
    "unipruning --help": "from unipruning.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "unipruning prune --help": ("from unipruning.cli import main\ntry:\n    main(['prune', '--help'])\n"
                                "except SystemExit:\n    pass"),
}


def best_of(code: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for label, code in CASES.items():
        print(f"{label:<28} {best_of(code, args.repeat):7.3f} s")


if __name__ == "__main__":
    main()
