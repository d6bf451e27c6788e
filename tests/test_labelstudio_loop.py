"""The relabelling loop on a real Label Studio server (issue 14), started by the test on loopback:

1. `visionflow annotate --backend labelstudio` creates a project with the review's top 5 classify
   samples, each with our current label as the pre-annotation and the model's guess beside it;
2. the project's task page, logged in, rendered in headless Chromium shows the task's image and
   its review reason (the screenshot is docs/img/labelstudio-review.png's source);
3. corrections are posted the way the browser's Submit saves them (POST /api/tasks/<id>/annotations
   with the regions and parent_prediction): two classes changed, one accepted unchanged, one
   skipped, one never opened; one correction uses another control name, the trap that makes
   FiftyOne's load_annotations delete labels;
4. `--pull` writes the corrected COCO version, points params.yaml at it, and the re-ingested
   manifest differs from the old one in exactly the two corrected labels;
5. the labelstudio-files package goes through the same server as a user elsewhere would take it
   (its label_config.xml and tasks.json imported, a box moved, the JSON export pulled from a file)
   and becomes version 2, built on version 1.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from visionflow.core.files import read_json
from visionflow.core.paths import Paths
from visionflow.manifest import read_categories, read_manifest

sys.path.insert(0, str(Path(__file__).parent))
from browser import DevTools, browser  # noqa: E402
from project import REPO, free_port  # noqa: E402
from relabel_project import relabel_project  # noqa: E402

LS = Path(os.environ.get("VISIONFLOW_LABEL_STUDIO") or REPO / ".venv-labelstudio/bin/label-studio")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not LS.exists(), reason=f"{LS} not installed: `make labelstudio` (make test and "
                                                         ".ci/run install it)")]
USER, PASSWORD = "reviewer@example.com", "visionflow-test-pw"
SCREENSHOT = os.environ.get("VISIONFLOW_SCREENSHOT_DIR")  # set to keep the screenshot (README's image)


class Server:
    def __init__(self, url: str, token: str, root: Path):
        self.url, self.token, self.root = url, token, root

    def api(self, method: str, path: str, body=None):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Authorization", f"Token {self.token}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
        return json.loads(text) if text else None

    def env(self) -> dict[str, str]:
        return {**os.environ, "LABEL_STUDIO_URL": self.url, "LABEL_STUDIO_API_KEY": self.token,
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.root)}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return relabel_project(tmp_path_factory.mktemp("ls-loop"))


@pytest.fixture(scope="module")
def server(project, tmp_path_factory):
    root = project[0].parent
    data = tmp_path_factory.mktemp("ls-data")
    port, token = free_port(), secrets.token_hex(20)
    env = {**os.environ, "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false",
           "LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root), "LABEL_STUDIO_BASE_DATA_DIR": str(data),
           "LABEL_STUDIO_HOST": f"http://127.0.0.1:{port}"}
    log = open(data / "server.log", "w")
    proc = subprocess.Popen([str(LS), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port),
                             "--username", USER, "--password", PASSWORD, "--user-token", token,
                             "--enable-legacy-api-token"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # the first start migrates a fresh database: about a minute here
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"Label Studio did not start: {(data / 'server.log').read_text()[-3000:]}")
        time.sleep(1)
    yield Server(url, token, root)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def _cli(server: Server, params_file: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "visionflow.cli", *args, "--params", str(params_file)],
                         env=server.env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _as_saved_by_the_browser(server: Server, task: dict, result: list, cancelled: bool = False) -> None:
    """What Label Studio's frontend posts on Submit (or Skip): the regions, the prediction it
    started from, the time spent."""
    server.api("POST", f"/api/tasks/{task['id']}/annotations/?project={task['project']}", {
        "result": result, "was_cancelled": cancelled, "ground_truth": False, "lead_time": 4.2,
        "parent_prediction": task["predictions"][0]["id"] if task.get("predictions") else None,
        "started_at": "2026-12-05T09:00:00Z"})


def _task(server: Server, task_id: int) -> dict:
    """A task with its predictions in full (the project export lists only their ids)."""
    task = server.api("GET", f"/api/tasks/{task_id}")
    task["predictions"] = sorted(server.api("GET", f"/api/predictions/?task={task_id}"), key=lambda p: p["id"])
    return task


def _choice(task: dict, name: str, from_name: str = "choice") -> list:
    current = task["predictions"][0]["result"][0]
    return [{**current, "from_name": from_name, "origin": "manual", "value": {"choices": [name]}}]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_the_loop_on_a_real_label_studio(project, server, tmp_path):
    params_file, paths = project
    root = params_file.parent
    original = root / "data/shapes/annotations.json"
    original_sha = _sha(original)
    before = {s.id: s for s in read_manifest(paths.manifest)}
    cats = {c.id: c.name for c in read_categories(paths.categories)}

    # 1. push
    out = _cli(server, params_file, "annotate", "--task", "classify", "--top", "5", "--backend", "labelstudio")
    assert "sent the 5 most likely label mistakes" in out.stdout
    session = read_json(paths.for_task("classify").annotate_session)
    project_id = session["project"]
    tasks = server.api("GET", f"/api/projects/{project_id}/export?exportType=JSON&download_all_tasks=true")
    assert len(tasks) == 5
    by_id = {t["data"]["visionflow_id"]: _task(server, t["id"]) for t in tasks}
    sent = [s["id"] for s in session["samples"]]
    assert set(by_id) == set(sent)
    for sid in sent:
        t = by_id[sid]
        current, model = t["predictions"]
        assert current["model_version"] == "current labels"
        assert current["result"][0]["value"]["choices"] == [cats[before[sid].labels[0]]]
        assert model["model_version"].startswith("model")
        assert model["result"][0]["value"]["choices"] == [cats[(before[sid].labels[0] + 1) % len(cats)]]
        assert t["annotations"] == []
    settings = server.api("GET", f"/api/projects/{project_id}")
    config = settings["label_config"]
    assert '<Choices name="choice"' in config and 'choice="single"' in config and "RectangleLabels" not in config
    # annotators start from the current labels: "use predictions to prelabel tasks" with that model version
    assert settings["show_collab_predictions"] is True and settings["model_version"] == "current labels"

    # 2. what the annotator sees
    if browser() is not None:
        first = by_id[sent[0]]
        page = DevTools(size=(1400, 1300))
        try:
            page.goto(server.url + "/user/login/")
            page.js(f"document.querySelector('input[name=email]').value = {json.dumps(USER)};"
                    f"document.querySelector('input[name=password]').value = {json.dumps(PASSWORD)};"
                    "document.querySelector('form').submit();")
            time.sleep(2)
            page.goto(f"{server.url}/projects/{project_id}/data?task={first['id']}")
            reason = first["data"]["review_reason"]
            shown = page.wait_for(f"document.body.innerText.includes({json.dumps(reason)})", 90)
            image_ok = page.wait_for("[...document.querySelectorAll('img')].some(i => i.src.includes("
                                     "'/data/local-files/?d=') && i.complete && i.naturalWidth === 64)", 60)
            labels_ok = page.wait_for(f"document.body.innerText.includes({json.dumps(cats[0])})", 30)
            checked = page.js("[...document.querySelectorAll('input[type=radio], input[type=checkbox]')]"
                              ".filter(i => i.checked).map(i => i.closest('label')?.innerText || '')")
            shot = page.screenshot(tmp_path / "labelstudio-review.png")
        finally:
            page.close()
        if SCREENSHOT:
            shutil.copy(shot, Path(SCREENSHOT) / "labelstudio-review.png")
        assert shown, "the task page does not show the review reason"
        assert image_ok, "the task's image was not served by Label Studio's local-files storage"
        assert labels_ok, "the task page does not show the class choices"
        # the annotator's draft starts from the current label (the prelabelling prediction)
        assert any(c.startswith(cats[before[sent[0]].labels[0]]) for c in checked), checked
        assert shot.stat().st_size > 20_000

    # 3. a person's answers
    new_class = {}
    for n, sid in enumerate(sent[:2]):
        t = by_id[sid]
        new_class[sid] = cats[(before[sid].labels[0] + 2) % len(cats)]
        # the second answer's control is named differently from the config's: still read, nothing lost
        _as_saved_by_the_browser(server, t, _choice(t, new_class[sid], "choice" if n == 0 else "class"))
    _as_saved_by_the_browser(server, by_id[sent[2]], by_id[sent[2]]["predictions"][0]["result"])  # accepted
    _as_saved_by_the_browser(server, by_id[sent[3]], [], cancelled=True)  # skipped; sent[4] never opened

    # 4. pull, re-ingest
    out = _cli(server, params_file, "annotate", "--task", "classify", "--pull")
    assert "3 of 5 sent samples reviewed (1 not yet, 1 skipped), 2 corrected" in out.stdout
    assert _sha(original) == original_sha
    source = yaml.safe_load(params_file.read_text())["ingest"]["sources"][0]
    assert source["annotations"] == "data/corrections/shapes/v1/annotations.json"
    record = read_json(root / "data/corrections/shapes/v1/corrections.json")
    assert record["corrected"] == 2 and record["reviewed"] == 3 and record["project"].endswith(f"/projects/{project_id}")
    _cli(server, params_file, "stage", "ingest")
    after = {s.id: s for s in read_manifest(paths.manifest)}
    assert set(after) == set(before)
    changed = {sid for sid in before if before[sid].to_dict() != after[sid].to_dict()}
    assert changed == set(sent[:2])
    for sid in sent[:2]:
        assert [cats[c] for c in after[sid].labels] == [new_class[sid]]
        assert after[sid].instances == before[sid].instances  # the boxes were not the classify review's

    # 5. the labelstudio-files package, through the same server as a user elsewhere would take it
    pkg = root / "pkg"
    _cli(server, params_file, "annotate", "--task", "detect", "--top", "3", "--backend", "labelstudio-files",
         "--out", str(pkg))
    assert (pkg / "README.txt").read_text().count("visionflow annotate --task detect --pull") == 1
    created = server.api("POST", "/api/projects", {"title": "from the package",
                                                   "label_config": (pkg / "label_config.xml").read_text()})
    server.api("POST", f"/api/projects/{created['id']}/import", json.loads((pkg / "tasks.json").read_text()))
    tasks = server.api("GET", f"/api/projects/{created['id']}/export?exportType=JSON&download_all_tasks=true")
    detect_sent = [s["id"] for s in read_json(paths.for_task("detect").annotate_session)["samples"]]
    t = _task(server, next(t["id"] for t in tasks if t["data"]["visionflow_id"] == detect_sent[0]))
    moved = json.loads(json.dumps(t["predictions"][0]["result"]))
    shift = -10.0 if moved[0]["value"]["x"] > 20 else 10.0  # 6.4 px on a 64 px image, staying inside it
    moved[0]["value"]["x"] += shift
    _as_saved_by_the_browser(server, t, moved)
    export = tmp_path / "export.json"
    export.write_text(json.dumps(server.api(
        "GET", f"/api/projects/{created['id']}/export?exportType=JSON&download_all_tasks=true")))
    out = _cli(server, params_file, "annotate", "--task", "detect", "--pull", str(export))
    assert "1 of 3 sent samples reviewed (2 not yet, 0 skipped), 1 corrected" in out.stdout
    source = yaml.safe_load(params_file.read_text())["ingest"]["sources"][0]
    assert source["annotations"] == "data/corrections/shapes/v2/annotations.json"
    _cli(server, params_file, "stage", "ingest")
    final = {s.id: s for s in read_manifest(paths.manifest)}
    changed = {sid for sid in before if before[sid].to_dict() != final[sid].to_dict()}
    assert changed == set(sent[:2]) | {detect_sent[0]}
    box, old = final[detect_sent[0]].instances[0].bbox, before[detect_sent[0]].instances[0].bbox
    dx = shift * 0.64
    assert box == pytest.approx([old[0] + dx, old[1], old[2] + dx, old[3]], abs=1e-3)
    assert final[detect_sent[0]].instances[1:] == before[detect_sent[0]].instances[1:]
    for sid in sent[:2]:  # version 2 was built on version 1: the classify corrections are still there
        assert final[sid].labels == after[sid].labels
    assert Paths(root).validation_report.exists()
    assert read_json(paths.validation_report)["sources"][0]["corrections"]["version"] == 2
