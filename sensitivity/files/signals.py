"""Signals: SIGTERM ends the run like Ctrl-C (clean-up runs, exit 143), and the few steps that must not be
cut in half (swapping a finished report folder into place, removing a temp folder) defer both signals."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["InterruptHandlers", "Terminated", "deferred_signals", "outputs_committed"]

_DEFERRED = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (context managers clean up), exit code 143."""


class InterruptHandlers:
    """SIGINT raises KeyboardInterrupt and SIGTERM raises `Terminated` in the main thread, until `done()`:
    from then on both are ignored, so a signal that arrives once the command has finished (while the
    interpreter shuts down, say) cannot turn a finished run into a traceback or a death by signal.
    `restore()` puts the previous handlers back (for callers that run the CLI in-process)."""

    def __init__(self) -> None:
        self.finished = False
        self.saved: dict[int, Any] = {}
        self.saved_hook: Any = None
        self.resending = False

    #: the handlers of the command running in this process (set by `install`), see `outputs_committed`
    active: InterruptHandlers | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.finished or self.resending:
            return
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    def _unraisable(self, unraisable: Any) -> None:
        """A signal whose exception was raised inside a weakref callback or `__del__` (run by the garbage
        collector at any bytecode) is printed and dropped by CPython, and the run would go on as if never
        interrupted. Such a signal is sent again from a helper thread, so the main thread receives it at
        its next bytecode: normally outside the callback, else the same happens once more. Until it is
        sent, further signals are dropped (one is on its way), so none can land inside this hook."""
        exc = unraisable.exc_value
        if isinstance(exc, KeyboardInterrupt | Terminated) and not self.finished:
            self.resending = True
            signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
            threading.Thread(target=self._resend, args=(signum,), daemon=True).start()
            return
        (self.saved_hook or sys.__unraisablehook__)(unraisable)

    def _resend(self, signum: int) -> None:
        time.sleep(0.02)  # the hook that started this thread has long returned
        self.resending = False
        os.kill(os.getpid(), signum)

    def install(self) -> InterruptHandlers:
        if threading.current_thread() is threading.main_thread():
            for sig in _DEFERRED:
                self.saved[sig] = signal.signal(sig, self._handle)
            self.saved_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
            InterruptHandlers.active = self
        return self

    def done(self) -> None:
        self.finished = True

    def ignore(self) -> None:
        """Ignore both signals at the OS level from now on: the interpreter's shutdown puts the default
        handlers back for Python-level handlers (a late SIGTERM would kill the finished process), never
        for ignored signals."""
        if threading.current_thread() is threading.main_thread():
            for sig in _DEFERRED:
                signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved.clear()
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self.saved_hook or sys.__unraisablehook__
        if InterruptHandlers.active is self:
            InterruptHandlers.active = None


def outputs_committed() -> None:
    """The command's outputs are in place (a report folder swapped in, staged files moved): from now on an
    interrupt would only cut short the closing messages, and its exit code and "nothing was written" line
    would be false, so the running command's handlers ignore further signals (and those held during the
    move). Without a command running (library use) nothing changes."""
    if InterruptHandlers.active is not None:
        InterruptHandlers.active.done()


@contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT / SIGTERM that arrive inside the block are held and delivered when it ends.

    Python-level handlers are swapped (masking the thread is not enough: CPython runs handlers in the main
    thread whichever thread the OS picked). Outside the main thread this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved: dict[int, Any] = {}
    for sig in _DEFERRED:
        saved[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        active = InterruptHandlers.active
        if active is None or not active.finished:
            for sig in dict.fromkeys(pending):
                signal.raise_signal(sig)
