"""The daily loop of a DVC user, in a real temporary git repository: `dvc exp run -S` twice,
`dvc exp show` with numbers in every row, `dvc metrics diff` and `dvc plots diff` between two
commits, and `git checkout` + `dvc checkout` of an older commit leaving `dvc status` clean.

This works because metrics, plots and the uncached reports are committed to git (the
.gitignore written here is the repository's own) and are a function of code, params and
inputs only."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from project import REPO, make_project  # noqa: E402

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_WAIT_POLICY": "PASSIVE",
       "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
DVC = [sys.executable, "-m", "dvc"]


def _run(cmd, cwd) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [n for v in tree.values() for n in _numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_experiments_compare_and_old_commits_check_out_clean(tmp_path):
    root = tmp_path / "proj"
    make_project(root, name="exps")  # the classify branch only: the loop is the same for every branch
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    _run(["git", "init", "-q"], root)
    _run([*DVC, "init", "-q"], root)
    _run([*DVC, "config", "core.analytics", "false"], root)
    _run([str(BIN / "visionflow"), "dvc-yaml"], root)  # this project's dvc.yaml (and plot templates)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "project"], root)

    _run([*DVC, "repro"], root)
    untracked = _run(["git", "status", "--porcelain", "--untracked-files=all"], root).split("\n")
    paths = {line[3:] for line in untracked if line}
    assert {"dvc.lock", "metrics/classify/train.json", "metrics/classify/evaluate.json", "metrics/split.json",
            "plots/classify/train_history.csv", "reports/classify/registration.json"} <= paths, paths
    assert not [p for p in paths if p.startswith(("data/", "models/")) or "predictions" in p], paths
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "baseline"], root)

    first = _run([*DVC, "exp", "run", "-S", "classify.train.epochs=2", "-n", "two-epochs"], root)
    assert "Running stage 'train-classify'" in first and "Running stage 'split'" not in first, first
    # `exp run` leaves its results in the workspace: the second experiment sets epochs back
    second = _run([*DVC, "exp", "run", "-S", "classify.train.epochs=1", "-S", "classify.train.lr=0.01",
                   "-n", "lr-0.01"], root)
    assert "Running stage 'train-classify'" in second

    shown = json.loads(_run([*DVC, "exp", "show", "--json"], root))
    rows = []
    for commit in shown:
        rows.append((commit["rev"], commit["data"]))
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                rows.append((exp.get("name") or rev["rev"], rev["data"]))
    names = [r for r, _ in rows]
    assert "two-epochs" in names and "lr-0.01" in names, names
    for name, data in rows:
        if name == "workspace":
            continue
        for metrics_file in ("metrics/classify/evaluate.json", "metrics/classify/train.json", "metrics/split.json"):
            entry = data["metrics"].get(metrics_file, {})
            assert _numbers(entry.get("data", {})), f"{name}: no numbers for {metrics_file}: {entry}"
    epochs = {name: data["params"]["params.yaml"]["data"]["classify"]["train"]["epochs"] for name, data in rows}
    assert epochs["two-epochs"] == 2 and epochs["lr-0.01"] == 1
    runs = {name: data["metrics"]["metrics/classify/train.json"]["data"]["epochs_run"] for name, data in rows}
    assert runs["two-epochs"] == 2 and runs["lr-0.01"] == 1

    # keep the first experiment as a commit; compare it with the baseline
    _run([*DVC, "exp", "apply", "two-epochs"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "two epochs"], root)
    diff = json.loads(_run([*DVC, "metrics", "diff", "HEAD~1", "HEAD", "--json"], root))
    assert diff["metrics/classify/train.json"]["epochs_run"] == {"old": 1, "new": 2, "diff": 1}, diff
    assert "failed to load" not in _run([*DVC, "metrics", "diff", "HEAD~1", "HEAD"], root)
    out = root / "plots_diff"
    plots = _run([*DVC, "plots", "diff", "HEAD~1", "HEAD", "-o", str(out)], root)
    assert "failed to load" not in plots and "could not find" not in plots, plots
    page = (out / "index.html").read_text()
    assert "HEAD~1" in page and "HEAD" in page and "train_history" in page

    # back to the baseline: git brings the small outputs, DVC the cached ones; nothing is stale
    _run(["git", "checkout", "-q", "HEAD~1"], root)
    _run([*DVC, "checkout"], root)
    status = _run([*DVC, "status"], root)
    assert "up to date" in status and "modified" not in status, status
