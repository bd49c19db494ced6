"""Figures drawn in forked workers: the same results as one process, whatever the children do (fail, die,
outlive an interrupted parent), and never a child left behind."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from sensitivity.report.plots.workers import _shares, render_in_workers, worker_count

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers fork on Linux only")


def _draw(i: int) -> bytes | None:
    return None if i % 4 == 3 else f"png {i}".encode() * (1 + 5000 * i)  # some over a pipe buffer


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_workers_return_what_one_process_draws(workers: int) -> None:
    costs = [float(i % 3 + 1) for i in range(9)]
    assert render_in_workers(9, _draw, costs, workers) == [_draw(i) for i in range(9)]


def test_shares_cover_every_job_once_and_balance_the_cost() -> None:
    costs = [1.0, 0.9, 0.7, 0.5, 0.4, 0.35, 0.25, 0.25, 0.25]
    for n in (1, 2, 3, 4):
        shares = _shares(costs, n)
        assert sorted(i for s in shares for i in s) == list(range(len(costs)))
        totals = [sum(costs[i] for i in s) for s in shares]
        assert max(totals) - min(totals) <= max(costs)


@pytest.mark.parametrize("how", ["raises", "exits", "killed"])
def test_a_failing_child_is_redrawn_by_the_parent(how: str) -> None:
    parent = os.getpid()

    def draw(i: int) -> bytes | None:
        if os.getpid() != parent:
            if how == "raises":
                raise RuntimeError("child broke")
            if how == "exits":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        return _draw(i)

    assert render_in_workers(6, draw, [1.0] * 6, 3) == [_draw(i) for i in range(6)]


def test_an_interrupted_parent_leaves_no_child_running(tmp_path: Path) -> None:
    parent = os.getpid()

    def draw(i: int) -> bytes | None:
        if os.getpid() != parent:
            (tmp_path / f"{os.getpid()}.pid").write_text("")
            time.sleep(60)
        else:
            deadline = time.monotonic() + 10
            while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            raise KeyboardInterrupt
        return None

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        render_in_workers(3, draw, [1.0] * 3, 3)
    assert time.monotonic() - start < 30, "the parent waited for its children instead of ending them"
    pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # ended and reaped: no zombie either
            os.kill(pid, 0)


def test_worker_count_is_bounded() -> None:
    assert worker_count(1) == 1
    assert 1 <= worker_count(9) <= 4
    assert worker_count(2) <= 2
