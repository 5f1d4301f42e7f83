"""A small driver for Debian's headless Chromium over the DevTools protocol, through
--remote-debugging-pipe (commands on fd 3, replies on fd 4, each a JSON text ending in NUL):
no browser download, no port, no websocket library.

    with Chromium() as browser:
        page = browser.open("file:///tmp/graph.html")
        page.evaluate("1 + 1")                  # -> 2
        page.click(100, 200); page.screenshot("shot.png")
        page.errors                             # console errors and uncaught exceptions
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

# the flags this machine needs (no sandbox as root, no GPU, and no background connections:
# the network is closed, and Chromium's own requests would only fail)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe", "--window-size=1600,1000"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class ProtocolError(Exception):
    pass


class Chromium:
    def __init__(self, executable: str | None = None, timeout: float = 30.0):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
        self.timeout = timeout
        self._next = 0
        self._replies = {}
        self._events = []          # (sessionId, method, params)
        self._cond = threading.Condition()

    def __enter__(self):
        self.profile = tempfile.mkdtemp(prefix="flame-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds():   # in the child: the pipe ends where Chromium looks for them (via
            os.dup2(to_child_r, 200)   # high numbers, in case a pipe end is itself 3 or 4)
            os.dup2(from_child_w, 201)
            os.dup2(200, 3)
            os.dup2(201, 4)
        self.proc = subprocess.Popen([self.executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     preexec_fn=fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_child_r)
        os.close(from_child_w)
        self._stderr = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        return self

    def __exit__(self, *exc):
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
        shutil.rmtree(self.profile, ignore_errors=True)

    def _read(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self._cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self._events.append((msg.get("sessionId"), msg["method"], msg.get("params", {})))
                self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout=None):
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while self._next not in self._replies:
                if getattr(self, "_closed", False):
                    raise ProtocolError(f"{method}: chromium exited: {b''.join(self._stderr)[-2000:].decode(errors='replace')}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{method}: no reply in {timeout or self.timeout:.0f} s")
                self._cond.wait(left)
            reply = self._replies.pop(self._next)
        if "error" in reply:
            raise ProtocolError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Runtime", "Log", "Network", "Page"):
            page.send(f"{domain}.enable")
        page.send("Page.navigate", {"url": url})
        return page


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def send(self, method, params=None, timeout=None):
        return self.browser.send(method, params, self.session, timeout)

    def events(self, method: str) -> list:
        with self.browser._cond:
            return [p for s, m, p in self.browser._events if s == self.session and m == method]

    @property
    def errors(self) -> list:
        """Console errors, uncaught exceptions and error log entries, as text."""
        out = []
        for p in self.events("Runtime.consoleAPICalled"):
            if p["type"] in ("error", "assert"):
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
                out.append(f"console.{p['type']}: {args}")
        for p in self.events("Runtime.exceptionThrown"):
            d = p["exceptionDetails"]
            out.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
        for p in self.events("Log.entryAdded"):
            if p["entry"]["level"] == "error":
                out.append("log: " + p["entry"]["text"])
        return out

    @property
    def requests(self) -> list:
        return [p["request"]["url"] for p in self.events("Network.requestWillBeSent")]

    def evaluate(self, expression: str, timeout=None):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True}, timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise ProtocolError(f"{expression[:80]}: {d.get('exception', {}).get('description', d.get('text'))}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, poll: float = 0.05):
        """Poll until the expression is truthy; returns the seconds it took."""
        t0 = time.monotonic()
        while True:
            try:
                if self.evaluate(expression):
                    return time.monotonic() - t0
            except ProtocolError:
                pass   # the page may not have loaded yet
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{expression!r} not true after {timeout:.0f} s; errors: {self.errors}")
            time.sleep(poll)

    def click(self, x: float, y: float):
        """A real left click (press and release) at page coordinates."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                   "clickCount": 0 if kind == "mouseMoved" else 1})

    def type_text(self, text: str):
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path: str):
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
