"""The report's figures rendered in forked worker processes, beside the parent's own share.

Agg spends most of a scan's report time rasterising text (hundreds of tick labels per figure) and holds the
GIL while it does, so threads do not help; forked children do: they share the parent's loaded modules and
`ReportData` for free and send back PNG bytes. The children only draw: they create no file, reset SIGINT
and SIGTERM to their default action (a Ctrl-C to the terminal's process group ends them at once, without
running the parent's clean-up), and leave through `os._exit`. The parent renders whatever a child did not
send back (it failed, or was killed) itself, so the result never depends on the workers. Linux only (fork
of a process with idle torch threads is safe there when the child never calls into torch)."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["render_in_workers", "worker_count"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def worker_count(jobs: int) -> int:
    """Processes to draw `jobs` figures with (the parent included): the CPUs this process may use, at most
    4, at most one per job; 1 (no fork) off Linux."""
    if not sys.platform.startswith("linux") or jobs < 2:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4, jobs))


def _shares(costs: Sequence[float], n: int) -> list[list[int]]:
    """Job indices split into `n` groups of about equal total cost (largest first onto the lightest)."""
    groups: list[list[int]] = [[] for _ in range(n)]
    totals = [0.0] * n
    for i in sorted(range(len(costs)), key=lambda j: -costs[j]):
        k = totals.index(min(totals))
        groups[k].append(i)
        totals[k] += costs[i]
    return [sorted(g) for g in groups]


def _child(write_fd: int, draw: Callable[[int], bytes | None], share: list[int]) -> None:
    """In the forked child: draw `share`, send {index: PNG or None} and leave without any clean-up."""
    code = 1
    try:
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        payload = pickle.dumps({i: draw(i) for i in share}, protocol=pickle.HIGHEST_PROTOCOL)
        with os.fdopen(write_fd, "wb") as fh:
            fh.write(payload)
        code = 0
    finally:
        os._exit(code)


@dataclass
class _Child:
    """A forked worker: its pid, the read end of its pipe, the jobs it draws, and what was cleaned up."""

    pid: int
    fd: int
    share: list[int]
    closed: bool = False
    reaped: bool = False

    def collect(self) -> dict[int, bytes | None]:
        """What the child sent ({} if it failed), after it has ended."""
        chunks = []
        try:
            with os.fdopen(self.fd, "rb", closefd=True) as fh:
                while chunk := fh.read(1 << 20):
                    chunks.append(chunk)
        finally:
            self.closed = True
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        if os.waitstatus_to_exitcode(status) != 0 or not chunks:
            return {}
        try:
            got = pickle.loads(b"".join(chunks))
        except Exception:
            return {}
        return got if isinstance(got, dict) else {}

    def stop(self) -> None:
        """An interrupted parent ends the child now (it only draws: nothing of its needs cleaning up)."""
        if not self.reaped:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(self.pid, 0)
            self.reaped = True
        if not self.closed:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.closed = True


def _fork(draw: Callable[[int], bytes | None], share: list[int]) -> _Child | None:
    """A child drawing `share`, or None where fork is refused. Both signals are blocked around the fork,
    so none can reach the child before it has put the default handlers back."""
    read_fd, write_fd = os.pipe()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork of a threaded process
            pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(read_fd)
        os.close(write_fd)
        return None
    if pid == 0:
        os.close(read_fd)
        _child(write_fd, draw, share)  # never returns
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    os.close(write_fd)
    return _Child(pid, read_fd, share)


def render_in_workers(
    count: int, draw: Callable[[int], bytes | None], costs: Sequence[float], workers: int | None = None
) -> list[bytes | None]:
    """`draw(i)` for i in range(count), shared between the parent and forked children by `costs`; the
    results in order. `workers` (processes, the parent included) defaults to `worker_count(count)`."""
    n = worker_count(count) if workers is None else max(1, min(workers, count))
    shares = _shares(costs, n) if n > 1 else [list(range(count))]
    children: list[_Child] = []
    results: dict[int, bytes | None] = {}
    try:
        mine = list(shares[0])
        for share in shares[1:]:
            child = _fork(draw, share)
            if child is None:
                mine += share
            else:
                children.append(child)
        for i in mine:
            results[i] = draw(i)
        for child in children:
            got = child.collect()
            for i in child.share:
                results[i] = got[i] if i in got else draw(i)
    finally:
        for child in children:
            child.stop()
    return [results[i] for i in range(count)]
