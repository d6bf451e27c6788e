"""Long-running services (the MLflow UI, the FiftyOne App, `visionflow serve`): stop on Ctrl-C
or SIGTERM alike, wait for a server to answer, stop a server's whole process group."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.request
from typing import Iterator

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def warn_if_exposed(host: str, what: str) -> None:
    """Services bind to loopback unless told otherwise; say so when told otherwise."""
    if host not in LOOPBACK:
        print(f"warning: {what} listens on {host}, reachable from other machines (no authentication)")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Inside, SIGTERM raises KeyboardInterrupt as Ctrl-C does, so `kill`, a process manager or a
    test stops the service through the same clean shutdown (a plain SIGTERM would skip it and
    orphan child servers). Outside the main thread, where no handler can be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_http(url: str, timeout: float = 60, proc: subprocess.Popen | None = None) -> bool:
    """Poll `url` until it answers 200; False on timeout or when `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server's whole process group (started with start_new_session=True): SIGTERM, then
    SIGKILL. Not SIGINT: uvicorn (the MLflow and Prefect servers) shuts down on it too, but then
    re-raises it, and asyncio prints a KeyboardInterrupt / CancelledError traceback; SIGTERM is
    its quiet shutdown. A second Ctrl-C while the server stops is ignored, not a traceback."""
    with _ignoring_ctrl_c():
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            deadline = time.monotonic() + grace
            try:
                os.killpg(proc.pid, sig)
                while time.monotonic() < deadline:
                    proc.poll()  # reap the leader so it stops counting as a member
                    os.killpg(proc.pid, 0)  # raises once no process of the group is left
                    time.sleep(0.2)
            except ProcessLookupError:
                return


@contextlib.contextmanager
def _ignoring_ctrl_c() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
