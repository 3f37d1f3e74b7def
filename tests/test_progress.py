"""Progress bars: every pass over the blocks opens its bar before block 0 starts, steps inside a block report
to the same object, bars stay silent with --quiet, and off a terminal plain lines come at least every
PLAIN_EVERY seconds (none for a job quicker than that)."""

import io
import time

import pytest

from unipruning.cli import main
from unipruning.config import Calibration, PruneConfig, RunOptions
from unipruning.jobs import prune_checkpoint
from unipruning.progress import Progress


class Recorder(Progress):
    """A Progress that records the calls it gets (and shows nothing)."""

    def __init__(self):
        super().__init__(disable=True)
        self.calls = []

    def __call__(self, done, total):
        self.calls.append(("blocks", done, total))
        super().__call__(done, total)

    def step(self, done, total):
        self.calls.append(("step", done, total))
        super().step(done, total)


@pytest.mark.parametrize("reconstruct", ["none", "obs"])
def test_a_pass_opens_before_block_0_and_reports_every_step(tiny_llama, text_file, tmp_path, reconstruct):
    progress = Recorder()
    prune_checkpoint(tiny_llama, str(tmp_path / "o"), PruneConfig(batch_size=2, reconstruct=reconstruct),
                     Calibration(text_file, 4, 16), RunOptions(progress=progress))
    blocks = [c for c in progress.calls if c[0] == "blocks"]
    passes = 2 if reconstruct == "obs" else 1
    assert blocks == [("blocks", d, 2) for d in (0, 1, 2)] * passes
    first = progress.calls.index(("blocks", 0, 2))
    assert progress.calls[first + 1] == ("step", 1, 2)  # block 0's steps come after its bar opened
    # every step of every block runs to its end: the calibration's 2 steps of 2 windows, the OBS pass's 4 entries
    # of one window each (weight_parallel.py: lane by lane)
    ends = [c for c in progress.calls if c[0] == "step" and c[1] == c[2]]
    assert ends.count(("step", 2, 2)) == 2  # the calibration's two blocks
    assert ends.count(("step", 4, 4)) >= (2 if reconstruct == "obs" else 0)  # the OBS pass's, at least once a block


def test_bars_write_to_a_terminal_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        Progress(disable=None)(0, 3)  # a bar on a terminal; off one, nothing at once (plain lines come later)
        assert ("blocks, pass 1" in stream.getvalue()) is shown


def test_off_a_terminal_a_plain_line_comes_at_least_every_period(monkeypatch):
    """A log or CI sees a line while a single slow step runs (the heartbeat), none for a quick pass."""
    import unipruning.progress as progress_module

    monkeypatch.setattr(progress_module, "PLAIN_EVERY", 1.5)
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    quick = Progress(disable=None)
    quick(0, 2)
    quick(2, 2)
    assert stream.getvalue() == ""
    slow = Progress(disable=None)
    slow(0, 2)
    slow.step(0, 4)
    deadline = time.monotonic() + 30  # one step that takes long: no update arrives, the heartbeat prints
    while len(stream.getvalue().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("unipruning: blocks, pass 1 0/2 blocks") for line in lines)
    assert "steps 0/4 steps" in lines[-1]
    slow.step(4, 4)
    slow(2, 2)  # the pass ends: its last state
    assert stream.getvalue().splitlines()[-1].startswith("unipruning: blocks, pass 1 2/2 blocks")


def test_quiet_prints_no_bar_even_on_a_terminal(tiny_llama, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert main(["prune", "--model", tiny_llama, "--out", str(tmp_path / "o"), "--calib", text_file,
                 "--nsamples", "4", "--seqlen", "16", "--quiet"]) == 0
    assert "blocks, pass" not in capsys.readouterr().err
