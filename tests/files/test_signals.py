"""Interrupts around the moment outputs land: before it nothing is written, during it the move finishes, after
it the command is done (no false "nothing was written" and exit code)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from sensitivity.files import folders
from sensitivity.files.folders import atomic_dir, staged_files
from sensitivity.files.signals import InterruptHandlers


@pytest.fixture
def handlers():
    h = InterruptHandlers().install()
    try:
        yield h
    finally:
        h.restore()


def _interrupting(real):
    def move(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # held: the move runs with signals deferred
        return real(*args, **kwargs)

    return move


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_the_commit_writes_nothing(tmp_path: Path, handlers, sig: signal.Signals) -> None:
    with pytest.raises(BaseException) as info, atomic_dir(tmp_path / "rep") as tmp:
        (tmp / "a.txt").write_text("x")
        signal.raise_signal(sig)
    assert type(info.value).__name__ == ("KeyboardInterrupt" if sig == signal.SIGINT else "Terminated")
    assert not (tmp_path / "rep").exists() and list(tmp_path.iterdir()) == []
    assert not handlers.finished


def test_a_signal_during_the_commit_lets_it_finish_and_ends_the_command(
    tmp_path: Path, handlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(folders, "_move_new", _interrupting(folders._move_new))
    with atomic_dir(tmp_path / "rep") as tmp:
        (tmp / "a.txt").write_text("x")
    assert (tmp_path / "rep" / "a.txt").read_text() == "x"
    assert handlers.finished  # later signals are ignored: the outputs are in place
    signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt


def test_staged_files_in_an_existing_folder_commit_the_same_way(tmp_path: Path, handlers) -> None:
    (tmp_path / "out").mkdir()
    with staged_files(tmp_path / "out") as tmp:
        (tmp / "model.pt").write_text("m")
    assert (tmp_path / "out" / "model.pt").read_text() == "m"
    assert handlers.finished


def test_without_a_command_running_a_held_signal_is_delivered_after_the_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Library use: no handlers of ours, so the caller's Ctrl-C is not swallowed (the folder is whole)."""
    assert InterruptHandlers.active is None
    monkeypatch.setattr(folders, "_move_new", _interrupting(folders._move_new))
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "rep") as tmp:
        (tmp / "a.txt").write_text("x")
    assert (tmp_path / "rep" / "a.txt").read_text() == "x"
