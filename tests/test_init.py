"""Your own data in one step: format detection, `visionflow init`, and stages that refuse to
run against a dvc.yaml that no longer matches params.yaml."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from project import REPO  # noqa: E402

from visionflow.core.config import load_params  # noqa: E402
from visionflow.core.errors import UserError  # noqa: E402
from visionflow.core.format_names import FORMATS  # noqa: E402
from visionflow.datasets.synth import render_dataset  # noqa: E402
from visionflow.formats import read_source, write_format  # noqa: E402
from visionflow.formats.detect import detect_source  # noqa: E402
from visionflow.integrations.prefect import STARTUP_TIMEOUT_VAR  # noqa: E402
from visionflow.stages import pipeline_stages  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    render_dataset(root / "src", n=12, size=48, seed=3)
    res = read_source("coco", root / "src", root / "src/annotations.json", "shapes")
    return root, res.samples, res.categories


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_written_layout_is_detected_and_reads_back(shapes, fmt, tmp_path):
    _, samples, categories = shapes
    out = tmp_path / "export"
    write_format(fmt, samples, categories, out)
    found = detect_source(out)
    assert found.format == fmt, found.describe()
    back = read_source(found.format, found.images, found.annotations, "x").samples
    assert len(back) == len(samples), found.describe()


def test_detection_explains_itself_or_refuses(shapes, tmp_path):
    _, samples, categories = shapes
    assert "COCO" in detect_source(shapes[0] / "src").why
    assert detect_source(shapes[0] / "src/annotations.json").format == "coco"  # the file itself
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no annotation format recognised.*--format"):
        detect_source(tmp_path / "empty")
    with pytest.raises(UserError, match="no such file"):
        detect_source(tmp_path / "missing")
    both = tmp_path / "both"
    write_format("cvat", samples, categories, both)
    write_format("yolo", samples, categories, both)
    with pytest.raises(UserError) as err:
        detect_source(both)
    assert "more than one annotation format fits" in str(err.value)
    assert "\n  cvat " in str(err.value) and "\n  yolo " in str(err.value)


def _cli(*args, cwd, ok=True):
    out = subprocess.run([str(BIN / "visionflow"), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert (out.returncode == 0) == ok, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout + out.stderr


@pytest.fixture
def project(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "flows", tmp_path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return tmp_path


def test_init_points_the_project_at_a_dataset_and_dvc_yaml_follows(project, shapes):
    _, samples, categories = shapes
    # a Label Studio export with several classes on some images: classify does not fit, multilabel does
    multi = [s for s in samples]
    for s in multi[:4]:
        s.labels = sorted({i.category_id for i in s.instances})
    write_format("labelstudio", multi, categories, project / "exports" / "My Pets")
    before = (project / "params.yaml").read_text()

    out = _cli("init", "exports/My Pets", cwd=project)
    assert "detected labelstudio" in out and "task multilabel:" in out and "task classify" not in out
    params = load_params(project / "params.yaml")
    assert params.ingest.sources[0].model_dump() == {
        "name": "my-pets", "format": "labelstudio", "images": "exports/My Pets",
        "annotations": "exports/My Pets/tasks.json", "categories": None, "path": None,
        "voc_coordinates": "auto", "corrections": None}
    assert set(params.tasks) == {"detect", "segment", "multilabel"}
    for task in params.tasks:
        branch = params.branch(task)
        assert branch.register.model_name == f"my-pets-{task}" and branch.inspect.dataset_name == f"my-pets-{task}-test"
    assert not params.renders_synth and "synth" not in [s.name for s in pipeline_stages(params)]
    assert "synth" not in yaml.safe_load((project / "params.yaml").read_text())
    assert (project / "params.yaml.bak").read_text() == before
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    assert "synth" not in dvc["stages"] and "exports/My Pets" in dvc["stages"]["ingest"]["deps"]
    assert _cli("dvc-yaml", "--check", cwd=project)

    # a second init would overwrite the kept params.yaml.bak: refused without --force
    assert "params.yaml.bak exists" in _cli("init", "exports/My Pets", cwd=project, ok=False)

    # the stage table and params agree: the ingest stage runs; edit a source and it refuses
    _cli("stage", "ingest", cwd=project)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["ingest"]["sources"][0]["images"] = "exports"
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    err = _cli("stage", "ingest", cwd=project, ok=False)
    assert "dvc.yaml does not match params.yaml" in err and "run `visionflow dvc-yaml`" in err
    assert "Traceback" not in err
    _cli("dvc-yaml", cwd=project)
    assert "exports" in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["ingest"]["deps"]


def test_init_refuses_data_without_trainable_labels(project, shapes, tmp_path):
    import dataclasses

    _, samples, categories = shapes
    bare = [dataclasses.replace(s, labels=[], instances=[]) for s in samples]
    write_format("coco", bare, categories, tmp_path / "bare")
    before = (project / "params.yaml").read_text()
    err = _cli("init", str(tmp_path / "bare"), cwd=project, ok=False)
    assert "12 images were read as coco, but no labels any task trains on" in err and "Traceback" not in err
    err = _cli("init", str(tmp_path / "nothing"), cwd=project, ok=False)
    assert "no such file or folder" in err and "Traceback" not in err
    assert (project / "params.yaml").read_text() == before and not (project / "params.yaml.bak").exists()


def test_a_params_typo_under_run_is_reported_before_prefect_starts(project):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["split"]["sed"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = subprocess.run([str(BIN / "visionflow"), "run"], cwd=project, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "split.sed: unknown key" in out.stderr
    text = out.stdout + out.stderr
    assert "Traceback" not in text and "temporary server" not in text.lower()
    assert text.count("unknown key") == 1, text


def test_init_on_a_real_roboflow_export_keeps_its_split_and_only_fitting_branches(project):
    """tests/data/real/roboflow-sharks-coco (see its README): 10 images in train/valid/test,
    60 boxes, 17 of them also outlined; segmenting would paint the other 43 as background."""
    shutil.copytree(REPO / "tests/data/real/roboflow-sharks-coco", project / "sharks")
    out = _cli("init", "sharks", cwd=project)
    assert "Roboflow COCO export" in out and "task detect: 60 boxed objects" in out
    assert "keeping the export's own split (split.keep_existing: true): test 1, train 7, val 2" in out
    params = load_params(project / "params.yaml")
    assert params.tasks == ("detect",) and params.split.keep_existing
    assert params.ingest.sources[0].images == params.ingest.sources[0].annotations == "sharks"


def _fresh_prefect(tmp_path: Path, **env: str) -> dict:
    """The environment of a machine that never ran Prefect: a new PREFECT_HOME, so Prefect's
    temporary server migrates a new database on its first start (21 s on an idle 2-core machine
    here, past Prefect's own 20 s wait), and no server or timeout set by the caller."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", STARTUP_TIMEOUT_VAR)}
    return {**clean, "PREFECT_HOME": str(tmp_path / "fresh-prefect-home"), **env}


def test_a_data_error_inside_a_stage_under_run_is_one_clean_error(project, tmp_path):
    """Also the first `visionflow run` on a machine: the temporary server's first start (a new
    database) is waited for; Prefect's own 20 s wait failed `make demo` on a fresh machine."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["ingest"]["sources"] = [{"name": "gone", "path": str(tmp_path / "no-such-export")}]
    raw.pop("synth", None)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = subprocess.run([str(BIN / "visionflow"), "run"], cwd=project, capture_output=True, text=True, timeout=400,
                         env=_fresh_prefect(tmp_path))
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "no-such-export: no such file or folder" in out.stderr, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert (tmp_path / "fresh-prefect-home").is_dir()  # the flow ran on a server of its own, first start


def test_prefects_server_not_answering_is_one_clean_error_that_says_what_to_set(project, tmp_path):
    out = subprocess.run([str(BIN / "visionflow"), "run"], cwd=project, capture_output=True, text=True, timeout=300,
                         env=_fresh_prefect(tmp_path, **{STARTUP_TIMEOUT_VAR: "1"}))
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "temporary server did not answer within 1 s" in out.stderr and STARTUP_TIMEOUT_VAR in out.stderr, text[-3000:]
    assert "PREFECT_API_URL" in out.stderr and "Traceback" not in text, text[-3000:]
    assert not (project / "data").exists()  # nothing ran


def test_prefects_startup_wait_is_raised_unless_the_user_set_it():
    code = ("import os, visionflow.integrations.prefect as p; "
            f"print(os.environ[{STARTUP_TIMEOUT_VAR!r}], p.STARTUP_TIMEOUT_S)")
    clean = {k: v for k, v in os.environ.items() if k != STARTUP_TIMEOUT_VAR}
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, timeout=60)
    assert ours.stdout.split() == ["180", "180"], ours.stderr[-2000:]
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**clean, STARTUP_TIMEOUT_VAR: "45"}, timeout=60)
    assert theirs.stdout.split()[0] == "45", theirs.stderr[-2000:]
