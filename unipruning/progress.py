"""Progress bars (tqdm, on stderr, with rate and ETA) for every step of a job that can take more than a few
seconds: the passes over the decoder blocks, the calibration steps inside a block, eval windows, packing,
the demo's training.

`Progress(disable=None)` shows bars only when stderr is a terminal (tqdm's own test), `disable=True`
never (`--quiet`), `disable=False` always. The jobs take a Progress, or None for no bars, which is what
the library does unless asked. A Progress is also the `(done, total)` callable of RunOptions.progress:
each pass over the blocks gets its own bar, opened at `done == 0`, before the first block starts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

STEP_DELAY = 2.0  # seconds a block's steps run before their bar appears: fast blocks never show one


class Progress:
    def __init__(self, disable: bool | None = None):
        self.disable = disable
        self._blocks = None
        self._steps = None
        self._passes = 0

    def bar(self, total: int, desc: str, unit: str, delay: float = 0.0, leave: bool = True):
        """A tqdm bar (a silent one when disabled); close it, or use it as a context manager."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=self.disable, delay=delay,
                    leave=leave, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        """Blocks of a pass: (0, total) opens the pass's bar, (done, total) advances it to `done`."""
        if done == 0 or self._blocks is None:
            self._close_blocks()
            self._passes += 1
            self._blocks = self.bar(total, f"blocks, pass {self._passes}", "block")
        self._blocks.update(done - self._blocks.n)
        if done == total:
            self._close_blocks()

    def step(self, done: int, total: int) -> None:
        """Calibration steps inside the current block; the bar shows only once a block runs for STEP_DELAY s."""
        if done == 0 or self._steps is None:
            self._close_steps()
            self._steps = self.bar(total, "  steps", "step", delay=STEP_DELAY, leave=False)
        self._steps.update(done - self._steps.n)
        if done == total:
            self._close_steps()

    def _close_blocks(self) -> None:
        self._close_steps()
        if self._blocks is not None:
            self._blocks.close()
            self._blocks = None

    def _close_steps(self) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None


def bar_of(progress: Progress | None, total: int, desc: str, unit: str):
    """A bar of `progress`, or a silent one when it is None (the library's default: no output)."""
    return (progress or Progress(disable=True)).bar(total, desc, unit)


def steps_of(progress) -> Callable[[int, int], None] | None:
    """The per-step callback of a progress object (a Progress), or None for a plain (done, total) callable."""
    return getattr(progress, "step", None)
