"""Every `visionflow stage` checks that dvc.yaml matches params.yaml. Rendering imports every
task's module (torch), so a DVC repository remembers a match in .dvc/tmp: the memo must save
that work and must never hide a dvc.yaml that no longer matches."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

from visionflow.core.config import load_params  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.integrations import dvc  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "proj"
    make_project(root, name="memo")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(dvc.render(load_params(root / "params.yaml"), Paths(root)))
    return root


def _stale(root: Path):
    return dvc.stale_dvc_yaml(load_params(root / "params.yaml"), Paths(root))


CHECK = """
import json, sys
from pathlib import Path
from visionflow.core.config import load_params
from visionflow.core.paths import Paths
from visionflow.integrations.dvc import stale_dvc_yaml
stale = stale_dvc_yaml(load_params(Path("params.yaml")), Paths(Path(".")))
print(json.dumps({"stale": stale, "rendered": "torch" in sys.modules}))
"""


def _check_in_a_process(root: Path, package_parent: Path | None = None) -> dict:
    """The check as a fresh `visionflow stage` process makes it: {"stale": message or None,
    "rendered": whether it imported the task modules (torch), which only rendering does}.
    package_parent: a folder holding another copy of the package, put first on the path."""
    env = {**os.environ, **({"PYTHONPATH": str(package_parent)} if package_parent else {})}
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_match_is_remembered_and_the_next_check_does_not_render(repo):
    memo = repo / ".dvc" / dvc.MATCHED_FILE
    assert _check_in_a_process(repo) == {"stale": None, "rendered": True}
    assert memo.is_file()
    assert "tmp" in (repo / ".dvc" / ".gitignore").read_text()  # DVC's scratch folder: git never sees it
    assert _check_in_a_process(repo) == {"stale": None, "rendered": False}  # no torch: the memo answered


def test_the_memo_never_hides_an_edited_dvc_yaml_or_a_changed_source(repo):
    assert _stale(repo) is None
    remembered = (repo / ".dvc" / dvc.MATCHED_FILE).read_text()

    # dvc.yaml edited by hand: the memo's dvc.yaml digest differs, so it renders and says so
    dvc_yaml = repo / "dvc.yaml"
    kept = dvc_yaml.read_text()
    dvc_yaml.write_text(kept + "# edited\n")
    assert "does not match params.yaml" in _stale(repo)
    dvc_yaml.write_text(kept)
    assert _stale(repo) is None

    # a new ingest source: dvc.yaml must list it as a dep, so the same dvc.yaml is now stale
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["ingest"]["sources"].append({"name": "more", "format": "coco", "path": "more"})
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "does not match params.yaml" in _stale(repo)

    # a value dvc.yaml does not hold (the split's seed): rendered once, then remembered again
    raw["ingest"]["sources"].pop()
    raw["split"]["seed"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert _stale(repo) is None
    assert (repo / ".dvc" / dvc.MATCHED_FILE).read_text() != remembered
    assert _check_in_a_process(repo) == {"stale": None, "rendered": False}


def test_a_garbled_memo_is_ignored(repo):
    memo = repo / ".dvc" / dvc.MATCHED_FILE
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_bytes(b"\xff\xfe not a digest")
    assert _stale(repo) is None
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text() + "# edited\n")
    memo.write_bytes(b"\xff\xfe not a digest")
    assert "does not match" in _stale(repo)


def test_an_edit_of_the_package_source_or_a_moved_project_renders_again(repo, tmp_path):
    """A copy of the package first on the path (what an edited checkout is): the same source
    gives the same digest, an edited module a new one. A project copied elsewhere carries its
    memo along, but the memo names the other place."""
    assert _check_in_a_process(repo)["stale"] is None  # remembered, by the installed package
    moved = tmp_path / "team" / "elsewhere"
    shutil.copytree(repo, moved)
    assert _check_in_a_process(moved) == {"stale": None, "rendered": True}

    copy = tmp_path / "checkout"
    shutil.copytree(dvc.PACKAGE_DIR, copy / "visionflow", ignore=shutil.ignore_patterns("__pycache__"))
    assert _check_in_a_process(repo, copy) == {"stale": None, "rendered": False}  # byte-equal source
    module = copy / "visionflow" / "tasks" / "segment.py"  # what a task's module says feeds dvc.yaml
    module.write_text(module.read_text() + "\n# edited\n")
    assert _check_in_a_process(repo, copy) == {"stale": None, "rendered": True}
    assert _check_in_a_process(repo, copy) == {"stale": None, "rendered": False}


def test_outside_a_dvc_repository_nothing_is_written_and_staleness_is_still_found(tmp_path):
    root = tmp_path / "plain"
    make_project(root, name="plain")
    (root / "dvc.yaml").write_text(dvc.render(load_params(root / "params.yaml"), Paths(root)))
    assert _stale(root) is None
    assert not (root / ".dvc").exists()
    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text() + "# edited\n")
    assert "does not match" in _stale(root)


def test_stage_refuses_a_stale_dvc_yaml_after_a_remembered_match(repo):
    def stage(name):
        return subprocess.run([str(BIN / "visionflow"), "stage", name], cwd=repo, capture_output=True, text=True,
                              timeout=300)

    first = stage("synth")
    assert first.returncode == 0, first.stderr
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["ingest"]["sources"][0]["name"] = "renamed"
    raw["ingest"]["sources"].append({"name": "more", "format": "coco", "path": "more"})
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    refused = stage("synth")
    assert refused.returncode != 0 and "does not match params.yaml" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
