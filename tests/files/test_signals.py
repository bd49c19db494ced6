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
    # Python's own Ctrl-C handler, as an interactive caller has it (a shell starts background jobs with
    # SIGINT ignored, and Python then leaves it ignored: the suite run with `&` would see nothing)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "rep") as tmp:
            (tmp / "a.txt").write_text("x")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "rep" / "a.txt").read_text() == "x"


class _SignalsWhenCollected:
    def __init__(self, sig: signal.Signals) -> None:
        self.sig = sig

    def __del__(self) -> None:
        signal.raise_signal(self.sig)  # its exception is raised inside __del__: CPython drops it


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("where", ["__del__", "weakref callback"])
def test_a_signal_inside_a_finaliser_still_ends_the_run(handlers, sig: signal.Signals, where: str) -> None:
    """The garbage collector runs finalisers at any bytecode; a signal that lands in one must not be lost
    (it was, in CI: SIGTERM during a weakref callback, the scan then finished and exited 0)."""
    import time
    import weakref

    class Target:
        pass

    with pytest.raises(BaseException) as info:
        if where == "__del__":
            obj = _SignalsWhenCollected(sig)
            del obj
        else:
            target = Target()
            keep = weakref.ref(target, lambda _ref: signal.raise_signal(sig))
            del target
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
        keep = None  # noqa: F841
    assert type(info.value).__name__ == ("KeyboardInterrupt" if sig == signal.SIGINT else "Terminated")


def test_other_unraisable_errors_still_reach_the_previous_hook(handlers) -> None:
    seen: list[BaseException] = []
    handlers.saved_hook = lambda u: seen.append(u.exc_value)

    class Broken:
        def __del__(self) -> None:
            raise ValueError("from __del__")

    Broken()
    assert [str(e) for e in seen] == ["from __del__"]
