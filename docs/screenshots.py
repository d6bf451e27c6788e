"""Re-take the README's review and explanation screenshots after `make demo`, and check each shows
what its caption says (headless Chromium over the DevTools protocol, loopback only):

    .venv/bin/python docs/screenshots.py            # writes docs/img/fiftyone_review.png,
                                                     # fiftyone_explained.png, mlflow_explain_grid.png

- the FiftyOne App on the classify test set's saved view `review` (most likely label mistakes first,
  with the review_score / review_reason fields);
- the App on the saved view `explained`: the test images with their class activation map (Heatmap
  field `cam`) drawn over them;
- the MLflow UI on the classify run's artifact figures/explain_grid.png (true class, prediction, CAM).

Each check fails loudly (exit 1) rather than keep a screenshot of an empty page.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from browser import DevTools  # noqa: E402

OUT = ROOT / "docs" / "img"
BIN = ROOT / ".venv" / "bin"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str], port: int, path: str = "/") -> subprocess.Popen:
    env = {**os.environ, "FIFTYONE_DO_NOT_TRACK": "true"}  # no analytics, and no banner asking for them
    proc = subprocess.Popen([str(BIN / "visionflow"), "ui", *args, "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5):
                return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"visionflow ui {' '.join(args)} did not answer on port {port}")


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"screenshot check failed: {what}")
    print(f"ok: {what}")


def _dismiss(page: DevTools) -> None:
    """Close the App's promotional pop-over (it covers the grid's corner)."""
    page.js("[...document.querySelectorAll('button, a, div')].filter(b => b.innerText?.trim() === 'Dismiss')"
            ".forEach(b => b.click())")
    time.sleep(1)


def fiftyone(page: DevTools) -> None:
    port = _port()
    proc = _serve(["fiftyone", "--task", "classify"], port)
    try:
        base = f"http://127.0.0.1:{port}/datasets/visionflow-shapes-test"
        opened = ("document.body.innerText.includes('review_score') && "
                  "!document.body.innerText.includes('Unsaved view')")
        page.goto(f"{base}?view=review")
        _check(page.wait_for(opened, 120), "the App opens the saved view `review` (its sort stage on review_score)")
        time.sleep(8)  # the grid's thumbnails
        _dismiss(page)
        _check(page.js(opened) is True, "still on the saved view `review` when the screenshot is taken")
        page.screenshot(OUT / "fiftyone_review.png")
        page.goto(f"{base}?view=explained")
        _check(page.wait_for("document.body.innerText.includes('12 samples') && "
                             "!document.body.innerText.includes('Unsaved view')", 120),
               "the App opens the saved view `explained`: the 12 test images with a CAM")
        time.sleep(8)
        _dismiss(page)
        _check(page.js("[...document.querySelectorAll('input[type=checkbox]')].some(i => i.checked && "
                       "i.closest('[data-cy]')?.innerText?.trim() === 'cam' || (i.checked && "
                       "i.parentElement?.parentElement?.innerText?.trim() === 'cam'))") is True,
               "the Heatmap field cam is ticked, so the maps are drawn")
        page.screenshot(OUT / "fiftyone_explained.png")
    finally:
        proc.terminate()


def mlflow(page: DevTools) -> None:
    registration = json.loads((ROOT / "reports/classify/registration.json").read_text())
    port = _port()
    proc = _serve(["mlflow", "--task", "classify"], port)
    try:
        url = (f"http://127.0.0.1:{port}/#/experiments/{registration['experiment_id']}/runs/"
               f"{registration['run_id']}/artifacts/figures/explain_grid.png")
        page.goto(url)
        # the artifact viewer draws the file from a blob: URL, under the file's name
        _check(page.wait_for("document.body.innerText.includes('figures/explain_grid.png') && "
                             "[...document.querySelectorAll('img')].some(i => i.complete && i.naturalWidth > 1000)", 120),
               "the MLflow UI shows the run's figures/explain_grid.png")
        page.js("document.querySelectorAll('[aria-label=Close], [aria-label=close]').forEach(b => b.click())")
        time.sleep(2)
        page.screenshot(OUT / "mlflow_explain_grid.png")
    finally:
        proc.terminate()


def main() -> None:
    page = DevTools(size=(1500, 950))
    try:
        fiftyone(page)
        mlflow(page)
    finally:
        page.close()


if __name__ == "__main__":
    main()
