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
