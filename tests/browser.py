"""Headless Chromium for tests that check what a page draws; None where no browser is installed."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

# No name resolves and every request goes to a closed port: a page that needs the network
# draws what it would draw offline.
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"]


def browser() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _chromium(url: str, args: list[str], offline: bool, budget_ms: int) -> subprocess.CompletedProcess | None:
    exe = browser()
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", f"--user-data-dir={profile}",
                              f"--virtual-time-budget={budget_ms}", *(OFFLINE if offline else []), *args, url],
                             capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def dump_dom(url: str, offline: bool = False, budget_ms: int = 10000) -> str | None:
    """The page's DOM after its scripts ran (`budget_ms` of virtual time)."""
    out = _chromium(url, ["--dump-dom"], offline, budget_ms)
    return None if out is None else out.stdout


def screenshot(url: str, path: Path, size: tuple[int, int] = (1300, 1000), offline: bool = False,
               budget_ms: int = 10000) -> Path | None:
    out = _chromium(url, [f"--screenshot={path}", f"--window-size={size[0]},{size[1]}"], offline, budget_ms)
    return None if out is None else path


class DevTools:
    """A headless Chromium driven over the DevTools protocol, for pages behind a login form (Label
    Studio): navigate, run JavaScript, wait for text, screenshot. Loopback only."""

    def __init__(self, size: tuple[int, int] = (1400, 900)):
        import json
        import socket
        import time
        import urllib.request

        from websockets.sync.client import connect

        exe = browser()
        if exe is None:
            raise RuntimeError("no chromium")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)  # chromium may still be writing
        self._proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                       "--disable-background-networking", f"--user-data-dir={self._profile.name}",
                                       f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
                                       f"--window-size={size[0]},{size[1]}", "about:blank"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.close()
                raise RuntimeError("chromium's DevTools endpoint did not come up")
            time.sleep(0.2)
        self._ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self._id = 0
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, **params):
        import json

        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 60.0) -> bool:
        import time

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.js(f"Boolean({expression})"):
                return True
            time.sleep(0.25)
        return False

    def screenshot(self, path: Path) -> Path:
        import base64

        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self._ws.close()
        except Exception:
            pass
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._profile.cleanup()
