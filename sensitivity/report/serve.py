"""`sensitivity view`: open report.html in a browser, or serve the folder on 127.0.0.1 when none can open.

On a headless machine (no DISPLAY on Linux, or no registered browser) a local HTTP server lets the user
open the report from their own machine through an SSH tunnel; it binds to loopback only.
"""

from __future__ import annotations

import functools
import http.server
import os
import sys
import webbrowser
from pathlib import Path

from sensitivity.report.data import ReportDataError

__all__ = ["ReportServer", "can_open_browser", "make_server", "open_in_browser"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the report folder; no per-request log lines on stderr (the CLI prints the URL once).

    Only requests addressed to the loopback names are answered: a page on another site that makes the
    browser resolve its own host name to 127.0.0.1 (DNS rebinding) sends its own name in `Host`, and gets
    421 Misdirected Request instead of the report."""

    def log_message(self, format: str, *args: object) -> None:
        return

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        port = self.server.server_address[1]
        allowed = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}
        return host in allowed or (port == 80 and host in ("127.0.0.1", "localhost", "[::1]"))

    def send_head(self):  # type: ignore[no-untyped-def]
        if not self._host_ok():
            self.send_error(421, "Misdirected Request: this server answers only to 127.0.0.1 / localhost")
            return None
        return super().send_head()


class ReportServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/report.html"


def make_server(folder: str | os.PathLike[str], port: int = 0, host: str = "127.0.0.1") -> ReportServer:
    """A server for `folder` on `host:port` (port 0: a free one). Call serve_forever(); Ctrl-C stops it."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ReportDataError(f"--port must be a port number in 0..65535 (0: a free one), got {port}")
    try:
        return ReportServer((host, port), handler)
    except OSError as exc:
        raise ReportDataError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from exc


def can_open_browser() -> bool:
    """False on a headless Linux session (no DISPLAY / WAYLAND_DISPLAY) or with no browser registered."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return False
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return True


def open_in_browser(report: Path) -> bool:
    """Open the file in the default browser; False when that is impossible here."""
    if not can_open_browser():
        return False
    try:
        return bool(webbrowser.open(report.resolve().as_uri()))
    except webbrowser.Error:
        return False
