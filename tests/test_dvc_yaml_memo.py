"""Every `visionflow stage` checks that dvc.yaml matches params.yaml. Rendering imports every
task's module (torch), so a DVC repository remembers a match in .dvc/tmp: the memo must save
that work and must never hide a dvc.yaml that no longer matches."""
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


def _no_render(*_):
    raise AssertionError("rendered although the memo says dvc.yaml matched")


def test_a_match_is_remembered_and_the_next_check_does_not_render(repo, monkeypatch):
    memo = repo / ".dvc" / dvc.MATCHED_FILE
    assert _stale(repo) is None and memo.is_file()
    assert "tmp" in (repo / ".dvc" / ".gitignore").read_text()  # DVC's scratch folder: git never sees it
    monkeypatch.setattr(dvc, "render", _no_render)
    assert _stale(repo) is None


def test_the_memo_never_hides_an_edited_dvc_yaml_or_a_changed_source(repo, monkeypatch):
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
    monkeypatch.setattr(dvc, "render", _no_render)
    assert _stale(repo) is None


def test_a_garbled_memo_is_ignored(repo):
    memo = repo / ".dvc" / dvc.MATCHED_FILE
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_bytes(b"\xff\xfe not a digest")
    assert _stale(repo) is None
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text() + "# edited\n")
    memo.write_bytes(b"\xff\xfe not a digest")
    assert "does not match" in _stale(repo)


def test_the_digest_follows_the_package_source_and_the_project_place(repo, tmp_path, monkeypatch):
    params, paths = load_params(repo / "params.yaml"), Paths(repo)
    package = tmp_path / "package"
    shutil.copytree(dvc.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(dvc, "PACKAGE_DIR", package)
    before = dvc._render_inputs(params, paths)
    assert dvc._render_inputs(params, paths) == before
    module = package / "tasks" / "segment.py"  # what a task's module says feeds dvc.yaml
    module.write_text(module.read_text() + "\n# edited\n")
    assert dvc._render_inputs(params, paths) != before

    moved = tmp_path / "elsewhere"
    shutil.copytree(repo, moved)
    assert dvc._render_inputs(params, Paths(moved)) != dvc._render_inputs(params, paths)


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
