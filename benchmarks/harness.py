"""Whole-process A/B timing: each command runs as its own process, alternated, medians of several runs.

Wall time is taken around the child process (start-up included, as a user feels it) and peak RSS from
the child's own rusage (os.wait4), so the two figures belong to that one process.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

__all__ = ["Measured", "compare", "run_once"]


@dataclass
class Measured:
    wall_s: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def rss(self) -> float:
        return statistics.median(self.peak_rss_mb)


def run_once(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one run of `cmd`; raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0


def compare(commands: dict[str, list[str]], repeats: int = 3, warmup: int = 1) -> dict[str, Measured]:
    """Run the commands in turn (A B C A B C ...) after `warmup` rounds; returns per-command figures."""
    env = dict(os.environ)
    results = {name: Measured() for name in commands}
    for r in range(warmup + repeats):
        for name, cmd in commands.items():
            wall, rss = run_once(cmd, env)
            if r >= warmup:
                results[name].wall_s.append(wall)
                results[name].peak_rss_mb.append(rss)
            print(f"  run {r + 1 - warmup:>2} {name:<12} {wall:7.2f} s  {rss:8.1f} MiB", file=sys.stderr)
    return results
