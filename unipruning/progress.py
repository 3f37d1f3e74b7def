"""Progress bars (tqdm, on stderr, with rate and ETA) for every step of a job that can take more than a few
seconds: the passes over the decoder blocks, the calibration steps inside a block, eval windows, packing,
the demo's training.

`Progress(disable=None)` shows bars when stderr is a terminal, and off a terminal (a log, `| tee`, CI) plain
lines instead: one at least every PLAIN_EVERY seconds while a bar is open (a heartbeat thread: a single slow
step still shows signs of life; a job, or an error, quicker than that prints none), and the last state of a pass
that printed any; `disable=True` never (`--quiet`),
`disable=False` bars always. The jobs take a Progress, or None for no bars, which is what
the library does unless asked. A Progress is also the `(done, total)` callable of RunOptions.progress:
each pass over the blocks gets its own bar, opened at `done == 0`, before the first block starts.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable

STEP_DELAY = 2.0  # seconds a block's steps run before their bar appears: fast blocks never show one
PLAIN_EVERY = 30.0  # off a terminal: the longest silence between two progress lines


class _PlainBar:
    """A bar's stand-in off a terminal: counts like a tqdm bar, prints through its Progress's plain lines."""

    def __init__(self, owner: Progress, total: int, desc: str, unit: str):
        self.owner, self.total, self.desc, self.unit, self.n = owner, total, desc.strip(), unit, 0
        self.start, self.shown = time.monotonic(), False
        owner._open(self)

    def update(self, count: int = 1) -> None:
        self.n += count
        self.owner._maybe_print()

    def text(self) -> str:
        return f"{self.desc} {self.n}/{self.total} {self.unit}s ({time.monotonic() - self.start:.0f} s)"

    def close(self) -> None:
        self.owner._close(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    def __init__(self, disable: bool | None = None):
        self.disable = disable
        self.stream = sys.stderr  # where plain lines go (the heartbeat prints from another thread)
        self.plain = disable is None and not self.stream.isatty()
        self._blocks = None
        self._steps = None
        self._passes = 0
        self._open_bars: list[_PlainBar] = []
        self._printed = time.monotonic()
        self._lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None

    def bar(self, total: int, desc: str, unit: str, delay: float = 0.0, leave: bool = True):
        """A tqdm bar (a silent one when disabled, plain lines off a terminal); close it, or use it as a context
        manager."""
        if self.plain:
            return _PlainBar(self, total, desc, unit)
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=self.disable, delay=delay,
                    leave=leave, dynamic_ncols=True)

    # ------------------------------------------------------------------ plain lines, off a terminal
    def _print(self) -> None:
        if self._open_bars:
            print("unipruning: " + ", ".join(b.text() for b in self._open_bars), file=self.stream, flush=True)
            for bar in self._open_bars:
                bar.shown = True
        self._printed = time.monotonic()

    def _maybe_print(self) -> None:
        with self._lock:
            if time.monotonic() - self._printed >= PLAIN_EVERY:
                self._print()

    def _open(self, bar: _PlainBar) -> None:
        with self._lock:
            if not self._open_bars:  # the first line comes after PLAIN_EVERY s: a quick job (or error) prints none
                self._printed = time.monotonic()
            self._open_bars.append(bar)
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=_beat, args=(weakref.ref(self),), daemon=True,
                                                   name="unipruning-progress")
                self._heartbeat.start()

    def _close(self, bar: _PlainBar) -> None:
        with self._lock:
            if bar in self._open_bars:
                if bar is self._open_bars[0] and bar.shown:
                    self._print()  # the last state of an outermost bar that has shown progress
                self._open_bars.remove(bar)

    def close(self) -> None:
        """Close every open bar (a job that stopped half-way: no bar, and no heartbeat, outlives it)."""
        self._close_blocks()
        for bar in list(self._open_bars):
            bar.close()

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


def _beat(ref: weakref.ref) -> None:
    """The heartbeat of a Progress off a terminal: a line when nothing was printed for PLAIN_EVERY s. It holds the
    Progress weakly and ends once no bar is open or the Progress is gone (the next bar starts another)."""
    while True:
        time.sleep(1.0)
        progress = ref()
        if progress is None:
            return
        with progress._lock:
            if not progress._open_bars:
                progress._heartbeat = None
                return
            if time.monotonic() - progress._printed >= PLAIN_EVERY:
                progress._print()
        del progress


def bar_of(progress: Progress | None, total: int, desc: str, unit: str):
    """A bar of `progress`, or a silent one when it is None (the library's default: no output)."""
    return (progress or Progress(disable=True)).bar(total, desc, unit)


def steps_of(progress) -> Callable[[int, int], None] | None:
    """The per-step callback of a progress object (a Progress), or None for a plain (done, total) callable."""
    return getattr(progress, "step", None)
