"""Chaos: `scan` and `apply` interrupted by SIGINT or SIGTERM at seeded random moments after their first line
of output, each a real process. Whatever the moment: the exit code is 130 / 143 (or 0 when the run had
already finished), no temp folder is left, the previous report is byte-identical (or, after a finished
run, complete), and the inputs are untouched."""

from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import ARCH
from tests.models import PlantedOutlierNet

ROOT = Path(__file__).resolve().parents[1]
REPORT_FILES = {"layers.csv", "scan.json", "exclude.yaml", "policy.yaml", "quant_state.pt", "model_quant.pt"}


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _start(argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    return subprocess.Popen([sys.executable, "-m", "sensitivity", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def _first_line(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> tuple[float, bytes]:
    """Block until the process prints its first line (or ends); returns when that was, and what was read
    (the caller decodes it with the rest: a read may end inside a multi-byte character)."""
    assert proc.stdout is not None
    end = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf and time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.05)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
    return time.monotonic(), buf


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, float]:
    """Inputs, one finished report, and how long an uninterrupted scan and apply take after their first line."""
    work = tmp_path_factory.mktemp("chaos")
    torch.save(PlantedOutlierNet().state_dict(), work / "model.pth")
    torch.save(torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0)), work / "calib.pt")
    spans = []
    for argv in (_scan_argv(work, "rep", overwrite=False), _apply_argv(work, "applied0")):
        proc = _start(argv, work)
        t0, head = _first_line(proc)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, (head + out).decode()[-2000:]
        spans.append(time.monotonic() - t0)
    return work, spans[0], spans[1]


def _scan_argv(work: Path, out: str, overwrite: bool = True) -> list[str]:
    return ["scan", str(work / "model.pth"), "--arch", ARCH, "--calib", str(work / "calib.pt"), "--out", out,
            "--no-smoothquant", *(["--overwrite"] if overwrite else [])]  # fmt: skip


def _apply_argv(work: Path, out: str) -> list[str]:
    return ["apply", str(work / "model.pth"), "--arch", ARCH, "--policy", str(work / "rep" / "policy.yaml"),
            "--onnx", "--out", out]  # fmt: skip


@pytest.mark.slow
def test_interrupts_at_random_points_leave_nothing_broken(setup: tuple[Path, float, float]) -> None:
    work, scan_span, apply_span = setup
    rng = random.Random(20261203)
    inputs = {name: _digest(work)[name] for name in ("model.pth", "calib.pt")}
    cases = []
    for i in range(8):
        sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
        kind = "scan" if i < 4 else "apply"
        span = scan_span if kind == "scan" else apply_span
        cases.append((kind, sig, rng.uniform(0.0, 1.1 * span), f"applied{i + 1}"))
    outcomes = []
    for pair in (cases[i : i + 2] for i in range(0, len(cases), 2)):  # two at a time: the machine has 2 cores
        before = _digest(work / "rep")
        procs = []
        for kind, sig, delay, out in pair:
            argv = _scan_argv(work, "rep") if kind == "scan" else _apply_argv(work, out)
            procs.append((kind, sig, delay, out, _start(argv, work)))
        for kind, sig, delay, out, proc in procs:
            t0, head = _first_line(proc)
            time.sleep(max(0.0, delay - (time.monotonic() - t0)))
            if proc.poll() is None:
                proc.send_signal(sig)
            text = (head + proc.communicate(timeout=300)[0]).decode()
            code = proc.returncode
            expected = 130 if sig == signal.SIGINT else 143
            assert code in (0, expected), f"{kind} {sig.name} after {delay:.2f}s: exit {code}\n{text[-3000:]}"
            assert "Traceback" not in text, text[-3000:]
            outcomes.append((kind, code))
            if kind == "apply":
                target = work / out
                assert (
                    not target.exists()
                    if code
                    else {"model_quant.pt", "model_quant.onnx", "export.json"}
                    <= {p.name for p in target.iterdir()}
                )
        report = _digest(work / "rep")
        if all(c != 0 for k, c in outcomes[-2:] if k == "scan"):
            assert report == before  # every scan of the pair was interrupted: the old report, byte for byte
        assert set(report) >= REPORT_FILES
        leftovers = [
            p.name for p in work.iterdir() if p.name.startswith(".") and not p.name.endswith(".resume.pt")
        ]
        assert leftovers == [], leftovers
        assert {name: _digest(work)[name] for name in inputs} == inputs
    assert any(code != 0 for _, code in outcomes)  # the seeded moments do interrupt runs
