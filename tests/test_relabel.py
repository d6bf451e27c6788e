"""`visionflow annotate` without a server: each task's correction rules checked by hand, and the
cvat-files loop end to end (package -> a person's edits in the CVAT file -> --pull -> a new COCO
version beside the original -> params.yaml -> ingest), with nothing else changed. The Label Studio
server loop is tests/test_labelstudio_loop.py."""
from __future__ import annotations

import hashlib
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from visionflow.cli import main
from visionflow.core.files import read_json
from visionflow.core.paths import Paths
from visionflow.formats.cvat import read_cvat
from visionflow.manifest import Instance, Sample, read_categories, read_manifest
from visionflow.stages.register import correction_tags
from visionflow.tasks import get_task

sys.path.insert(0, str(Path(__file__).parent))
from relabel_project import relabel_project  # noqa: E402

SQUARE = [[0.0, 0.0, 10.0, 0.0, 10.0, 10.0, 0.0, 10.0]]


def _sample(labels=(), instances=()) -> Sample:
    return Sample(id="s/a.png", root="data", path="a.png", width=100, height=100, sha256="0" * 64,
                  labels=list(labels), instances=list(instances), attributes={"split": "test"})


# --- the correction rules, by hand -------------------------------------------------------------------

def test_classify_correction_replaces_the_class_only():
    task = get_task("classify")
    s = _sample([1], [Instance(bbox=[0, 0, 10, 10], category_id=1, polygons=SQUARE)])
    view = task.label_view(s)
    assert view.labels == [1] and view.instances == [] and view.attributes == {}
    out = task.apply_correction(s, Sample(**{**view.__dict__, "labels": [2]}))
    assert out.labels == [2] and out.instances == s.instances and out.attributes == {"split": "test"}


def test_detect_correction_keeps_what_the_box_view_did_not_show():
    task = get_task("detect")
    kept = Instance(bbox=[0, 0, 10, 10], category_id=1, polygons=SQUARE, attributes={"occluded": True})
    moved = Instance(bbox=[20, 20, 40, 40], category_id=2, polygons=[[20, 20, 40, 20, 40, 40]])
    gone = Instance(bbox=[50, 50, 60, 60], category_id=3)
    crowd = Instance(bbox=[70, 70, 90, 90], category_id=1, iscrowd=True)
    s = _sample([1], [kept, moved, gone, crowd])
    view = task.label_view(s)
    assert [i.bbox for i in view.instances] == [kept.bbox, moved.bbox, gone.bbox]  # no crowd region shown
    assert all(not i.polygons and not i.attributes for i in view.instances)
    corrected = Sample(**{**view.__dict__, "instances": [
        Instance(bbox=[0.2, 0.1, 10.3, 9.8], category_id=1),  # within half a pixel: the same box
        Instance(bbox=[22, 20, 40, 40], category_id=2),  # moved: a new box, its stale outline not kept
        Instance(bbox=[5, 60, 15, 70], category_id=4)]})  # added; `gone` deleted
    out = task.apply_correction(s, corrected)
    assert out.instances[0] is kept  # polygons and attributes survive
    assert out.instances[1] == Instance(bbox=[22, 20, 40, 40], category_id=2)
    assert out.instances[2] == Instance(bbox=[5, 60, 15, 70], category_id=4)
    assert out.instances[3] is crowd and len(out.instances) == 4
    assert out.labels == [1] and out.attributes == s.attributes


def test_segment_correction_matches_outlines():
    task = get_task("segment")
    a = Instance(bbox=[0, 0, 10, 10], category_id=1, polygons=SQUARE, area=100.0)
    b = Instance(bbox=[20, 20, 30, 30], category_id=2, polygons=[[20, 20, 30, 20, 30, 30, 20, 30]])
    s = _sample([], [a, b])
    view = task.label_view(s)
    recolored = Instance(bbox=b.bbox, category_id=3, polygons=b.polygons)
    out = task.apply_correction(s, Sample(**{**view.__dict__, "instances": [
        Instance(bbox=a.bbox, category_id=1, polygons=[[v + 0.1 for v in SQUARE[0]]]), recolored]}))
    assert out.instances[0] is a  # the same outline: its area etc. kept
    assert out.instances[1] == recolored


# --- the cvat-files loop -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return relabel_project(tmp_path_factory.mktemp("relabel"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_before_any_annotate_says_what_to_do(project, capsys):
    params_file, _ = project
    assert main(["annotate", "--params", str(params_file), "--task", "classify", "--pull"]) == 2
    err = capsys.readouterr().err
    assert "nothing was sent for classify" in err and "visionflow annotate --task classify --top N" in err


def test_cvat_files_loop_writes_a_new_version_and_changes_nothing_else(project, capsys):
    params_file, paths = project
    root = params_file.parent
    original = root / "data/shapes/annotations.json"
    original_sha = _sha(original)
    before = {s.id: s for s in read_manifest(paths.manifest)}
    out = root / "package"
    assert main(["dvc-yaml", "--params", str(params_file)]) == 0  # a DVC project: the pull regenerates it
    assert main(["annotate", "--params", str(params_file), "--task", "detect", "--top", "4",
                 "--backend", "cvat-files", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sent the 4 most likely label mistakes" in printed and "--pull EXPORT_FILE" in printed
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "annotations.xml", "images", "review.csv"]
    assert len(list((out / "images").iterdir())) == 4
    session = read_json(Paths(root).for_task("detect").annotate_session)
    sent = [s["id"] for s in session["samples"]]
    review = read_json(Paths(root).for_task("detect").review)["samples"]
    assert sent == [r["id"] for r in review[:4]]

    # What the package holds is our current boxes, readable as CVAT for images 1.1.
    pkg = read_cvat(out / "images", out / "annotations.xml", "pkg")
    names = {c.id: c.name for c in pkg.categories}
    first = before[sent[0]]
    got = sorted((names[i.category_id], [round(v, 2) for v in i.bbox]) for i in pkg.samples[0].instances)
    cats = {c.id: c.name for c in read_categories(paths.categories)}
    assert got == sorted((cats[i.category_id], [round(v, 2) for v in i.bbox]) for i in first.instances)

    # A person in CVAT: relabels image 1's first box as "star" (or "circle" if it is a star), deletes
    # image 2's last box, leaves images 3 and 4; the export is the same file format.
    doc = ET.parse(out / "annotations.xml")
    images = doc.getroot().findall("image")
    box = images[0].find("box")
    old_label = box.get("label")
    box.set("label", "circle" if old_label == "star" else "star")
    second_boxes = images[1].findall("box")
    images[1].remove(second_boxes[-1])
    export = root / "export.xml"
    doc.write(export, encoding="utf-8", xml_declaration=True)

    assert main(["annotate", "--params", str(params_file), "--task", "detect", "--pull", str(export)]) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 sent samples reviewed" in printed and "2 corrected" in printed
    assert _sha(original) == original_sha  # the user's annotations are never modified
    version = root / "data/corrections/shapes/v1"
    record = read_json(version / "corrections.json")
    assert record["corrected"] == 2 and record["review"]["report"] == "reports/detect/review.json"
    assert [s["id"] for s in record["samples"]] == sorted(sent[:2])
    source = yaml.safe_load(params_file.read_text())["ingest"]["sources"][0]
    assert source == {"name": "shapes", "format": "coco", "images": "data/shapes",
                      "annotations": "data/corrections/shapes/v1/annotations.json",
                      "corrections": "data/corrections/shapes/v1/corrections.json"}

    # dvc.yaml follows: ingest now depends on the new version and its record, so `dvc repro` re-runs from ingest
    assert main(["dvc-yaml", "--check", "--params", str(params_file)]) == 0
    ingest_deps = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["ingest"]["deps"]
    assert {"data/corrections/shapes/v1/annotations.json", "data/corrections/shapes/v1/corrections.json"} <= set(ingest_deps)
    assert main(["stage", "ingest", "--params", str(params_file)]) == 0
    after = {s.id: s for s in read_manifest(paths.manifest)}
    assert set(after) == set(before)
    changed = {sid for sid in before if before[sid].to_dict() != after[sid].to_dict()}
    assert changed == set(sent[:2])
    cat_id = {v: k for k, v in cats.items()}
    relabelled = after[sent[0]].instances[0]
    assert relabelled.category_id == cat_id["circle" if old_label == "star" else "star"]
    assert relabelled.bbox == pytest.approx(before[sent[0]].instances[0].bbox)
    # the other boxes of that image were untouched: they keep their polygons
    assert after[sent[0]].instances[1:] == before[sent[0]].instances[1:]
    assert after[sent[1]].instances == before[sent[1]].instances[:-1]
    validation = read_json(paths.validation_report)
    assert validation["sources"][0]["corrections"]["corrected"] == 2
    tags = correction_tags(paths)
    assert tags["data.labels_corrected"] == "2"
    assert "detect review reports/detect/review.json" in tags["data.corrections_review"]


def test_a_label_outside_the_project_is_refused_by_name(project, tmp_path, capsys):
    params_file, _ = project
    out = tmp_path / "pkg"
    assert main(["annotate", "--params", str(params_file), "--task", "detect", "--top", "1",
                 "--backend", "cvat-files", "--out", str(out)]) == 0
    doc = ET.parse(out / "annotations.xml")
    doc.getroot().find("image").find("box").set("label", "dragon")
    label = ET.SubElement(doc.getroot().find("meta").find("task").find("labels"), "label")
    ET.SubElement(label, "name").text = "dragon"
    doc.write(tmp_path / "export.xml")
    params_before = params_file.read_text()
    assert main(["annotate", "--params", str(params_file), "--task", "detect", "--pull",
                 str(tmp_path / "export.xml")]) == 2
    err = capsys.readouterr().err
    assert "'dragon'" in err and "not a category of the project" in err
    assert params_file.read_text() == params_before


def test_segment_prediction_view_is_one_mask_region_per_class_and_reads_back(tmp_path):
    """The model's mask, as the annotator sees it beside the outlines: one brush region per class,
    which Label Studio's reader (the one a pull uses) turns back into the same pixels."""
    import json

    import numpy as np
    from PIL import Image

    from visionflow.core.config import ReviewParams
    from visionflow.formats import ConversionReport
    from visionflow.formats.labelstudio import WRITE_POLICIES, read_labelstudio, sample_results
    from visionflow.manifest.masks import decode_rle

    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 10:30] = 1  # category 0
    mask[20:35, 40:55] = 3  # category 2
    Image.fromarray(mask).save(tmp_path / "pred.png")
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    s = Sample(id="s/a.png", root=str(tmp_path), path="a.png", width=60, height=40, sha256="0" * 64)
    view = get_task("segment").prediction_view(s, {"mask_path": tmp_path / "pred.png"}, ReviewParams())
    assert [(i.category_id, i.bbox, i.area) for i in view.instances] == [
        (0, [10.0, 5.0, 30.0, 15.0], 200.0), (2, [40.0, 20.0, 55.0, 35.0], 225.0)]
    results = sample_results(view, {0: "circle", 1: "square", 2: "star"}, ConversionReport(dict(WRITE_POLICIES)), "P")
    assert [r["type"] for r in results] == ["brushlabels", "brushlabels"]
    (tmp_path / "tasks.json").write_text(json.dumps([{"id": 1, "data": {"image": "a.png"},
                                                      "annotations": [{"id": 1, "result": results}]}]))
    back = read_labelstudio(tmp_path, tmp_path / "tasks.json", "t").samples[0]
    for want, got in zip(view.instances, back.instances):
        np.testing.assert_array_equal(decode_rle(got.rle, 40, 60, "back"), decode_rle(want.rle, 40, 60, "want"))


def test_detect_prediction_view_keeps_boxes_over_the_review_confidence():
    from visionflow.core.config import ReviewParams

    s = _sample([], [])
    record = {"boxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "labels": [1, 2], "scores": [0.9, 0.2]}
    view = get_task("detect").prediction_view(s, record, ReviewParams(min_confidence=0.5))
    assert view.instances == [Instance(bbox=[1.0, 2.0, 3.0, 4.0], category_id=1)]


def test_an_imagefolder_relabel_is_refused_with_the_way_round_it(tmp_path):
    """In an ImageFolder tree the class is the folder: the corrected class cannot be written without
    moving the image (a new sample id, a new split). The pull refuses, names the CSV route, and
    changes nothing."""
    from PIL import Image

    from visionflow.core.config import load_params
    from visionflow.core.errors import UserError
    from visionflow.relabel import write_version
    from visionflow.stages import get_stage

    sys.path.insert(0, str(Path(__file__).parent))
    from project import make_project

    for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        (tmp_path / "data/pets" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), colour).save(tmp_path / "data/pets" / cls / f"{i}.png")
    params_file = make_project(tmp_path, {"ingest": {"sources": [{"name": "pets", "format": "imagefolder",
                                                                  "images": "data/pets", "annotations": "data/pets"}]}})
    params = load_params(params_file)
    paths = Paths(tmp_path)
    get_stage("ingest", params).run(params, paths)
    s = next(s for s in read_manifest(paths.manifest) if s.id == "pets/cat/0.png")
    dog = next(c.id for c in read_categories(paths.categories) if c.name == "dog")
    before = params_file.read_text()
    with pytest.raises(UserError, match="export the source as CSV"):
        write_version(paths, params.ingest.sources[0], get_task("classify"),
                      {s.id: (s, Sample(**{**s.__dict__, "labels": [dog]}))}, read_categories(paths.categories),
                      {"review": {"task": "classify"}, "reviewed": 1})
    assert params_file.read_text() == before
    assert not any((tmp_path / "data/corrections/pets").glob("v*"))  # no half-written version left
