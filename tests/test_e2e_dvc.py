"""End to end: `dvc repro` in a real temporary git repository, then a second `dvc repro`
that reproduces nothing."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from project import REPO, TASKS, make_project  # noqa: E402

from visionflow.core.config import load_params  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.stages import pipeline_stages  # noqa: E402

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def test_dvc_repro_twice(tmp_path):
    root = tmp_path / "proj"
    make_project(root, name="e2edvc", tasks=TASKS)  # every branch, as the repo's dvc.yaml has
    for rel in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / rel, root / rel)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], root, env)
    _run([*dvc, "init", "-q"], root, env)
    _run([*dvc, "config", "core.analytics", "false"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)

    first = _run([*dvc, "repro"], root, env)
    for stage in pipeline_stages(load_params(root / "params.yaml")):
        assert f"Running stage '{stage.name}'" in first, stage.name
    assert (root / "dvc.lock").exists()
    for task in TASKS:
        paths = Paths(root, task)
        assert paths.registration.exists() and paths.inspection.exists(), task

    # every plot definition names fields its file has (else `dvc plots show` warns and draws nothing)
    for plot in yaml.safe_load((root / "dvc.yaml").read_text())["plots"]:
        (path, spec), = plot.items()
        header = (root / path).read_text().splitlines()[0].split(",")
        fields = [spec["x"], *(spec["y"] if isinstance(spec["y"], list) else [spec["y"]])]
        missing = [f for f in fields if f not in header]
        assert not missing, f"{path}: plot fields {missing} not in its columns {header}"

    # metrics files are flat numbers: no per-class column (the header grew with the classes)
    shown = _run([*dvc, "metrics", "show"], root, env)
    assert "circle" not in shown and "failed" not in shown, shown[:2000]

    second = _run([*dvc, "repro"], root, env)
    assert "Running stage" not in second, second
    assert "up to date" in second
    status = _run([*dvc, "status"], root, env)
    assert "changed" not in status, status

    # DVC's outputs are a function of code, params and inputs: the Prefect flow re-running every
    # stage (retraining each model) leaves them byte-equal, so DVC still sees nothing to do and
    # registration finds each model already registered.
    locked = (root / "dvc.lock").read_text()
    flow = _run([str(Path(sys.executable).parent / "visionflow"), "run"], root, env)
    assert "Traceback" not in flow, flow[-3000:]
    for task in TASKS:  # each line logged inside a stage names the stage
        assert f"[register-{task}] " in flow, flow[-3000:]
    status = _run([*dvc, "status"], root, env)
    assert "changed" not in status and "modified" not in status, status
    assert (root / "dvc.lock").read_text() == locked
    for task in TASKS:
        reg = json.loads(Paths(root, task).registration.read_text())
        assert reg["version"] == "1" and "reused" not in reg, (task, reg)

    # Code deps are derived from imports: editing a module that only the segmenter's code
    # imports makes exactly the segment branch stale, nothing else.
    models = root / "src/visionflow/models/segmenters.py"
    models.write_text(models.read_text() + "\n# edited by the test\n")
    out = subprocess.run([*dvc, "status", "--json"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stale = json.loads(out.stdout)
    assert set(stale) == {f"{s}-segment" for s in ("train", "evaluate", "register", "inspect", "review", "promote")}, stale
    for stage, changes in stale.items():
        assert changes == [{"changed deps": {"src/visionflow/models/segmenters.py": "modified"}}], (stage, changes)
