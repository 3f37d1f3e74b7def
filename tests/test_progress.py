"""Progress bars: every pass over the blocks opens its bar before block 0 starts, steps inside a block report
to the same object, and bars stay silent with --quiet or when stderr is not a terminal."""

import io

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
    assert progress.calls.count(("step", 2, 2)) >= 2 * passes  # every step of every block


def test_bars_write_to_a_terminal_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        Progress(disable=None)(0, 3)  # tqdm's own test of the stream: None = only on a terminal
        assert ("blocks, pass 1" in stream.getvalue()) is shown


def test_quiet_prints_no_bar_even_on_a_terminal(tiny_llama, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert main(["prune", "--model", tiny_llama, "--out", str(tmp_path / "o"), "--calib", text_file,
                 "--nsamples", "4", "--seqlen", "16", "--quiet"]) == 0
    assert "blocks, pass" not in capsys.readouterr().err
