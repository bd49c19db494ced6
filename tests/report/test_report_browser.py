"""report.html in a real headless Chromium, driven over the DevTools protocol (CDP) on a pipe.

`--remote-debugging-pipe` speaks NUL-terminated JSON on fds 3 (in) and 4 (out), so the client below needs
only the standard library: no websocket package, no chromedriver. Checks: the page loads with no console
errors or exceptions, requests nothing but itself (plots and downloads are data: URIs), the excluded row is
highlighted, clicking a header sorts the table, typing filters it; a full-page screenshot is saved.
Under CI=true a missing Chromium fails the test instead of skipping it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from sensitivity import scan
from sensitivity.report import render_report
from tests.models import PlantedOutlierNet

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
TIMEOUT_S = 60.0


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    reason = "Chromium not installed (apt-get install -y chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}: CI must run the browser test")
    pytest.skip(reason)


class CDPError(RuntimeError):
    pass


class Chromium:
    """A headless Chromium child in its own process group, with a blocking CDP client on its pipe."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # move the child's ends above fd 10 so the dup2 onto 3/4 always clears close-on-exec
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_child_r, from_child_w)]
        os.close(to_child_r)
        os.close(from_child_w)
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        actions = [
            (os.POSIX_SPAWN_DUP2, null, 0),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
            (os.POSIX_SPAWN_DUP2, ends[0], 3),
            (os.POSIX_SPAWN_DUP2, ends[1], 4),
        ]
        argv = [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        try:
            self.pid = os.posix_spawn(binary, argv, dict(os.environ), file_actions=actions, setpgroup=0)
        finally:
            for fd in (*ends, log_fd, null):
                os.close(fd)
        self._out, self._in = to_child_w, from_child_r
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    # -------------------------------------------------------------------------------------- protocol
    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError("timed out waiting for Chromium")
            ready, _, _ = select.select([self._in], [], [], left)
            if ready:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise CDPError("Chromium closed the DevTools pipe (see chromium.log)")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        for event in self.events:
            if event["method"] == method:
                return event
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            event = self._read_message(deadline)
            if "method" in event:
                self.events.append(event)
                if event["method"] == method:
                    return event

    def close(self) -> None:
        with contextlib.suppress(CDPError, OSError):
            self.send("Browser.close")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.05)
        else:
            os.killpg(self.pid, signal.SIGKILL)  # our own child's process group, nothing else
            os.waitpid(self.pid, 0)
        for fd in (self._out, self._in):
            os.close(fd)


class Page:
    """One tab: evaluate JavaScript, click at an element's centre with real mouse events, type text."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.browser.send(method, params, self.session)

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        find = f"document.querySelector({json.dumps(selector)})"
        box = self.js(
            f"(() => {{ const e = {find}; e.scrollIntoView({{block: 'center', behavior: 'instant'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}
            )

    def settle(self, read: Callable[[], Any], expected: Any) -> Any:
        """Input events reach the page asynchronously to Runtime.evaluate: read until the value is the
        expected one or 5 s pass, and return the last value read (for the assertion's message)."""
        deadline = time.monotonic() + 5
        value = read()
        while value != expected and time.monotonic() < deadline:
            time.sleep(0.05)
            value = read()
        return value

    def first_rows(self, n: int = 4) -> list[str]:
        return self.js(
            "Array.from(document.querySelectorAll('#layer-table tbody tr'))"
            f".filter(r => !r.hidden).slice(0, {n}).map(r => r.dataset.name)"
        )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn((4, 3, 12, 12), generator=g) for _ in range(4)]
    out = tmp_path_factory.mktemp("browser") / "planted"
    scan(PlantedOutlierNet(), batches, model_name="planted").save(str(out))
    render_report(out)
    return out


@pytest.mark.skipif(not hasattr(os, "posix_spawn"), reason="needs os.posix_spawn (POSIX)")
def test_report_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    binary = _chromium()
    browser = Chromium(binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(browser, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.send(f"{domain}.enable")
        page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )
        url = (report / "report.html").resolve().as_uri()
        page.send("Page.navigate", {"url": url})
        browser.wait_event("Page.loadEventFired")
        assert page.js("document.title").startswith("planted")
        assert page.js("document.querySelectorAll('#layer-table tbody tr').length") == 4
        loaded = "Array.from(document.images).every(i => i.complete && i.naturalWidth > 300)"
        assert page.settle(lambda: page.js(loaded), True) is True  # every plot decoded

        # highlighted rows: the excluded layer's cells are tinted, the others are not
        bg = (
            "getComputedStyle(document.querySelector('tr[data-name=\"{}\"] td:nth-child(3)')).backgroundColor"
        )
        assert page.js(bg.format("mid")) != page.js(bg.format("post"))

        # sorting: first click ascending, second descending, by isolated naive relative L1
        table = pd.read_csv(report / "layers.csv").set_index("name")["iso_naive_rel_l1"]
        assert page.first_rows() == list(table.index)  # execution order as rendered
        page.click('#layer-table th[data-key="iso_naive_rel_l1"]')
        ascending = list(table.sort_values(kind="stable").index)
        assert page.settle(page.first_rows, ascending) == ascending
        page.click('#layer-table th[data-key="iso_naive_rel_l1"]')
        descending = list(table.sort_values(ascending=False, kind="stable").index)
        assert descending[0] == "mid"
        assert page.settle(page.first_rows, descending) == descending
        assert page.js(
            "document.querySelector('th[data-key=\"iso_naive_rel_l1\"]').getAttribute('aria-sort')"
        ) == ("descending")

        # filtering by typing, and the detail-column toggle
        page.click("#filter")
        assert page.settle(lambda: page.js("document.activeElement.id"), "filter") == "filter"
        page.send("Input.insertText", {"text": "pos"})
        assert page.settle(page.first_rows, ["post"]) == ["post"]
        assert page.js("document.getElementById('row-count').textContent") == "1 of 4 layers"
        hidden = "document.querySelector('th[data-key=\"iso_naive_mse\"]').offsetParent === null"
        assert page.js(hidden)
        page.click("#all-columns")
        assert page.settle(lambda: page.js(hidden), False) is False
        page.js(
            "const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input'))"
        )

        # full-page screenshot, from the top (the sticky bar would otherwise sit mid-page)
        page.click("#all-columns")
        page.js("window.scrollTo({top: 0, behavior: 'instant'})")
        assert page.settle(lambda: page.js("window.scrollY"), 0) == 0
        size = page.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = page.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True,
             "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}},
        )  # fmt: skip
        png = base64.b64decode(shot["data"])
        (tmp_path / "report.png").write_bytes(png)
        assert png.startswith(b"\x89PNG") and len(png) > 50_000
    finally:
        browser.close()

    errors = [
        e["params"]
        for e in browser.events
        if (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or e["method"] == "Runtime.exceptionThrown"
        or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert errors == [], errors
    requests = [
        e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"
    ]
    assert [u for u in requests if not u.startswith("data:")] == [url], requests
    print(f"\nscreenshot: {tmp_path / 'report.png'}", file=sys.stderr)
