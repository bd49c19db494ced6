"""Whole-process A/B timing: each command runs as its own process, alternated, medians of several runs.

Wall time is taken around the child process (start-up included, as a user feels it) and peak RSS from
the child's own rusage (os.wait4), so the two figures belong to that one process.

On Linux a child's ru_maxrss is at least the peak RSS its parent had reached when it spawned it (the
high-water mark survives subprocess's vfork + exec), so `compare` from a parent that has used a lot of
memory itself (an in-process scan, a large model) raises every child's figure to that peak.
`compare_isolated` runs `compare` from a fresh Python process that imports no torch instead.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Measured", "compare", "compare_isolated", "run_measured", "run_once"]


@dataclass
class Measured:
    wall_s: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    #: user + system CPU seconds of the child: far steadier than wall time when other jobs share the cores
    cpu_s: list[float] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def rss(self) -> float:
        return statistics.median(self.peak_rss_mb)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_s) if self.cpu_s else float("nan")


def run_once(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one run of `cmd`; raises if it fails."""
    wall, rss, _ = run_measured(cmd, env)
    return wall, rss


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, user + system CPU seconds) of one run of `cmd`; raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime


def compare(commands: dict[str, list[str]], repeats: int = 3, warmup: int = 1) -> dict[str, Measured]:
    """Run the commands in turn (A B C A B C ...) after `warmup` rounds; returns per-command figures."""
    env = dict(os.environ)
    results = {name: Measured() for name in commands}
    for r in range(warmup + repeats):
        for name, cmd in commands.items():
            wall, rss, cpu = run_measured(cmd, env)
            if r >= warmup:
                results[name].wall_s.append(wall)
                results[name].peak_rss_mb.append(rss)
                results[name].cpu_s.append(cpu)
            print(
                f"  run {r + 1 - warmup:>2} {name:<12} {wall:7.2f} s  {rss:8.1f} MiB  cpu {cpu:7.2f} s",
                file=sys.stderr,
            )
    return results


def compare_isolated(
    commands: dict[str, list[str]], repeats: int = 3, warmup: int = 1
) -> dict[str, Measured]:
    """`compare` run by a fresh, light Python process (this file), so no child inherits our peak RSS."""
    spec = json.dumps({"commands": commands, "repeats": repeats, "warmup": warmup})
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        input=spec,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return {name: Measured(**m) for name, m in json.loads(proc.stdout).items()}


if __name__ == "__main__":  # the light process of `compare_isolated`: spec JSON on stdin, results on stdout
    _spec = json.load(sys.stdin)
    _res = compare(_spec["commands"], repeats=_spec["repeats"], warmup=_spec["warmup"])
    json.dump({name: asdict(m) for name, m in _res.items()}, sys.stdout)
