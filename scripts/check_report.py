#!/usr/bin/env python3
"""Open a ``kiln explain`` HTML report in headless Chromium and check that it renders cleanly.

Usage: ``python scripts/check_report.py REPORT.html [--screenshot OUT.png] [--chromium PATH] [--timeout S]``

Talks to Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
separated by NUL bytes on file descriptors 3 and 4; no websocket library, no playwright needed). It loads
the file, then fails (exit 1) on any of: an uncaught exception or a ``console.error``/``console.assert``
(``Runtime``), a browser log entry of level error (``Log``: failed loads, CSP, ...), any request that is
not ``file:``/``data:`` (the report must be self-contained), the page's own script not having run
(``document.body.dataset.ready``), no inline SVG, or a blank screenshot (the full page, captured as PNG,
decoded with zlib: fewer than 8 distinct byte values in its pixel rows). Prints one JSON object with
what it found; writes the screenshot (default: REPORT.png). Exit 2 when Chromium or the file is missing.
Chromium: ``/usr/bin/chromium`` (``apt-get install -y chromium``), run with
``--headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update
--disable-sync --no-first-run``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "chromium", "chromium-browser", "google-chrome")


def find_chromium(explicit: str | None = None) -> str | None:
    for c in ([explicit] if explicit else CANDIDATES):
        path = c if os.path.isabs(c) and os.access(c, os.X_OK) else shutil.which(c)
        if path:
            return path
    return None


class DevTools:
    """A minimal DevTools-protocol client over Chromium's --remote-debugging-pipe."""

    def __init__(self, chromium: str, profile: str, log_file, width: int = 1400, height: int = 900):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds():  # the protocol lives on fds 3 (commands in) and 4 (replies out)
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [chromium, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "--hide-scrollbars", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, pass_fds=(3, 4), preexec_fn=wire_fds)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from Chromium in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the DevTools pipe (exit code {self.proc.poll()})")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while True:
            ev = self._read_message(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass


def png_is_blank(png: bytes) -> tuple[bool, int, int]:
    """(blank?, width, height) of a PNG: blank if its decoded rows hold fewer than 8 distinct bytes."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        data = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", data[:8])
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    raw = zlib.decompress(idat)
    return len(set(raw[:4_000_000])) < 8, width, height


def check(report: Path, chromium: str, screenshot: Path, timeout: float = 60.0) -> dict:
    url = report.resolve().as_uri()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kiln-chromium-") as profile, tempfile.TemporaryFile() as log_file:
        dt = DevTools(chromium, profile, log_file)
        try:
            target = dt.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                dt.send(f"{domain}.enable", session=session)
            dt.send("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 900, "deviceScaleFactor": 1,
                                                           "mobile": False}, session=session)
            nav = dt.send("Page.navigate", {"url": url}, session=session, timeout=timeout)
            if nav.get("errorText"):
                problems.append(f"navigation failed: {nav['errorText']}")
            dt.wait_event("Page.loadEventFired", timeout)
            state = json.loads(dt.send("Runtime.evaluate", {
                "expression": "JSON.stringify({ready: document.body && document.body.dataset.ready || null, "
                              "svgs: document.querySelectorAll('svg').length, "
                              "sections: Array.from(document.querySelectorAll('section[id]')).map(s => s.id), "
                              "height: document.documentElement.scrollHeight})",
                "returnByValue": True}, session=session)["result"]["value"])
            shot = dt.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                           session=session, timeout=timeout)
            png = base64.b64decode(shot["data"])
        finally:
            dt.close()
            log_file.seek(0)
            browser_log = log_file.read().decode(errors="replace")
    for ev in dt.events:
        method, p = ev.get("method"), ev.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            problems.append(f"uncaught exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            problems.append(f"console.{p['type']}: {args}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            problems.append(f"browser log error: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            req_url = p.get("request", {}).get("url", "")
            if not req_url.startswith(("file:", "data:", "about:")):
                problems.append(f"network request (the report must be self-contained): {req_url}")
    if state.get("ready") != "1":
        problems.append("the page's script did not run to the end (document.body.dataset.ready unset)")
    if not state.get("svgs"):
        problems.append("no inline SVG rendered")
    screenshot.write_bytes(png)
    blank, w, h = png_is_blank(png)
    if blank:
        problems.append("the screenshot is blank")
    return {"report": str(report), "ok": not problems, "problems": problems, "svgs": state.get("svgs"),
            "sections": state.get("sections"), "page_height": state.get("height"),
            "screenshot": str(screenshot), "screenshot_size": [w, h], "chromium": chromium,
            "browser_log_lines": len(browser_log.splitlines())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--screenshot", type=Path, help="PNG to write (default: REPORT.png)")
    ap.add_argument("--chromium", help="the browser binary (default: /usr/bin/chromium, then PATH)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each browser step")
    args = ap.parse_args(argv)
    if not args.report.is_file():
        print(f"check_report: error: {args.report}: no such file", file=sys.stderr)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("check_report: error: no Chromium found (apt-get install -y chromium, or pass --chromium)",
              file=sys.stderr)
        return 2
    result = check(args.report, chromium, args.screenshot or args.report.with_suffix(".png"), args.timeout)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
