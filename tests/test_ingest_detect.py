"""`visionflow ingest PATH` and `ingest.sources` entries without `format`: the format and layout
are detected (and said), zips are extracted safely, and each source's summary says what was
detected, read and counted. Inputs are real exports from tests/data/real/ (see its README)."""
import json
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from project import REPO, make_project  # noqa: E402

from visionflow.core.config import IngestParams, SourceParams, load_params  # noqa: E402
from visionflow.core.errors import DataError  # noqa: E402
from visionflow.core.files import safe_extract_zip  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.manifest import read_manifest  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402
from visionflow.stages.ingest import ingest  # noqa: E402

REAL = REPO / "tests/data/real"
BIN = Path(sys.executable).parent


def _cli(*args, cwd, ok=True) -> str:
    out = subprocess.run([str(BIN / "visionflow"), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert (out.returncode == 0) == ok, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    return out.stdout + out.stderr


@pytest.fixture
def project(tmp_path):
    make_project(tmp_path)
    return tmp_path


DETECTED = {  # every real export in tests/data/real/ by its folder: the format its tool wrote
    "cvat-1.1-task-2label": "cvat", "cvat-coco1.0": "coco", "cvat-voc-1.1-2label": "voc", "cvat-yolo1.1": "yolo",
    "labelimg-voc-2label": "voc", "labelimg-yolo": "yolo", "labelimg-yolo-tree": "yolo",
    "mmpose-coco-keypoints": "coco", "panopticapi-sample": "coco", "roboflow-sharks-coco": "coco",
    "roboflow-sharks-yolov9": "yolo", "roboflow-skinproblem-multilabel": "csv", "roboflow-voc-chess": "voc",
    "voc-devkit-mmdet": "voc", "labelstudio-keypoints-yolo": "yolo", "labelstudio-mixed-yolo": "yolo", "labelstudio-obb-yolo": "yolo",
    "labelstudio-keypoints-coco": "coco", "labelstudio-polygon-coco": "coco",
    "roboflow-dhcn-semantic-masks": "masks",
}


@pytest.mark.parametrize("folder", sorted(DETECTED))
def test_each_real_export_folder_is_detected_as_its_tool_wrote_it(folder):
    from visionflow.formats.detect import detect_source

    assert detect_source(REAL / folder).format == DETECTED[folder]


@pytest.mark.parametrize("name", ["labelstudio-keypoints/data_keypoints.json",
                                  "labelstudio-keypoints/data_keypoints.min.json"])
def test_label_studio_json_and_json_min_exports_are_detected(name):
    from visionflow.formats.detect import detect_source

    assert detect_source(REAL / name).format == "labelstudio"


# the real exports whose images are vendored with them (the others' tests render stand-ins)
WITH_IMAGES = {"cvat-1.1-task-2label": 4, "cvat-coco1.0": 4, "cvat-voc-1.1-2label": 4, "cvat-yolo1.1": 4,
               "labelimg-voc-2label": 4, "labelimg-yolo": 4, "labelimg-yolo-tree": 2, "roboflow-sharks-coco": 10,
               "roboflow-sharks-yolov9": 10, "roboflow-voc-chess": 11, "roboflow-dhcn-semantic-masks": 6}


@pytest.mark.parametrize("folder", sorted(WITH_IMAGES))
def test_each_real_export_folder_reads_every_image_through_the_detected_layout(folder):
    """What `visionflow init FOLDER` and `ingest FOLDER` do: detect, then read. CVAT's COCO 1.0
    export keeps its images in images/ beside annotations/, and its file_name values are bare."""
    from visionflow.formats import read_source
    from visionflow.formats.detect import detect_source

    found = detect_source(REAL / folder)
    result = read_source(found.format, found.images, found.annotations, "s")
    assert len(result.samples) == WITH_IMAGES[folder], found.describe()
    assert all(Path(s.root, s.path).is_file() for s in result.samples)


@pytest.mark.parametrize("layout", ["datumaro", "coco2017", "fiftyone", "file-given"])
def test_coco_images_are_found_where_each_exporter_puts_them(tmp_path, layout):
    """The CVAT COCO 1.0 export's own files, laid out as other COCO exporters write them."""
    from visionflow.formats import read_source
    from visionflow.formats.detect import detect_source

    src = REAL / "cvat-coco1.0"
    ann, images = {"datumaro": ("annotations/instances_default.json", "images/default"),
                   "coco2017": ("annotations/instances_val2017.json", "val2017"),
                   "fiftyone": ("labels.json", "data"),
                   "file-given": ("annotations/instances_default.json", "images")}[layout]
    (tmp_path / ann).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "annotations/instances_default.json", tmp_path / ann)
    shutil.copytree(src / "images", tmp_path / images)
    (tmp_path / "birds.jpg").write_bytes((src / "images/birds.jpg").read_bytes())  # one name also at the root
    found = detect_source(tmp_path / ann if layout == "file-given" else tmp_path)
    assert (found.format, found.images, found.annotations) == ("coco", tmp_path / images, tmp_path / ann)
    assert len(read_source(found.format, found.images, found.annotations, "s").samples) == 4


def test_every_real_export_is_in_the_detection_table():
    exports = {p.name for p in REAL.iterdir() if p.is_dir()}
    assert exports <= set(DETECTED) | {p for p in exports if p.startswith("labelstudio")}, exports - set(DETECTED)


def test_ingest_path_detects_cvat_yolo_1_1_and_says_so(project, tmp_path):
    out = _cli("ingest", str(REAL / "cvat-yolo1.1"), "--name", "straw", "--out", str(tmp_path / "o"), cwd=project)
    assert "detected yolo:" in out
    # 4 images, 18 boxes (tests/test_real_yolo_coco.py counts them from the label files)
    assert "source straw (yolo; " in out and "4 images, 18 instances" in out
    report = json.loads((tmp_path / "o/validation.json").read_text())
    (source,) = report["sources"]
    assert source["format"] == "yolo" and source["detected"] and source["samples"] == 4


def test_a_zipped_roboflow_export_is_extracted_and_ingested(project):
    archive = project / "sharks.zip"
    src = REAL / "roboflow-sharks-coco"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(src).as_posix())
    out = _cli("ingest", "sharks.zip", "--name", "sharks", cwd=project)
    assert "detected coco: _annotations.coco.json per split folder" in out
    samples = read_manifest(Paths(project).manifest)
    assert len(samples) == 10 and sum(len(s.instances) for s in samples) == 60
    assert all(s.root == "data/extracted/sharks" for s in samples)
    assert {s.attributes.get("split") for s in samples} == {"train", "val", "test"}
    assert (project / "data/extracted/sharks/train/_annotations.coco.json").exists()
    # the same archive again: the extraction is reused, the manifest identical
    before = Paths(project).manifest.read_bytes()
    _cli("ingest", "sharks.zip", "--name", "sharks", "--force", cwd=project)
    assert Paths(project).manifest.read_bytes() == before


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil.txt", "a/../../evil.txt"])
def test_unsafe_zip_members_are_refused_before_anything_is_written(tmp_path, member):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/annotations.json", "{}")
        zf.writestr(member, "x")
    with pytest.raises(DataError, match="would land outside the extraction folder") as err:
        safe_extract_zip(archive, tmp_path / "out" / "x")
    assert str(archive) in str(err.value) and member in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_links_in_a_zip_are_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("images/a.jpg")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        safe_extract_zip(archive, tmp_path / "out")
    not_zip = tmp_path / "not.zip"
    not_zip.write_text("hello")
    with pytest.raises(DataError, match="not a readable zip archive"):
        safe_extract_zip(not_zip, tmp_path / "out")


def test_a_params_source_with_only_a_path_is_detected_and_tracked_by_dvc(project):
    shutil.copytree(REAL / "labelimg-voc-2label", project / "exports/voc")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["ingest"]["sources"] = [{"name": "fruit", "path": "exports/voc"}]
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(project / "params.yaml")
    paths = Paths(project)
    result = get_stage("ingest", params).run(params, paths)
    (source,) = result["sources"]
    # LabelImg VOC, 25 objects (tests/test_real_cvat_voc.py counts them from the XML files)
    assert source["format"] == "voc" and source["instances"] == 25 and "Pascal VOC" in source["detected"]
    assert [str(p) for p in get_stage("ingest", params).deps(paths, params)] == [str(project / "exports/voc")]


def test_a_source_needs_a_path_or_both_images_and_annotations():
    with pytest.raises(ValueError, match="give `path`"):
        SourceParams(name="s", images="x")
    with pytest.raises(ValueError, match="not both"):
        SourceParams(name="s", path="x", images="y")


def test_a_named_format_that_does_not_fit_says_what_it_looks_like(project):
    err = _cli("ingest", str(REAL / "cvat-yolo1.1"), "--format", "voc", "--out", "o", cwd=project, ok=False)
    assert "no voc layout found here; it looks like yolo" in err


def test_without_format_the_annotations_file_is_detected(project, tmp_path):
    src = REAL / "cvat-coco1.0"
    ann = next(src.rglob("*.json"))
    res = ingest(IngestParams(sources=[SourceParams(name="c", images=str(src / "images") if (src / "images").is_dir()
                                                    else str(src), annotations=str(ann))]),
                 Paths(project), out_dir=tmp_path / "o")
    assert res["sources"][0]["format"] == "coco" and res["sources"][0]["detected"]


def test_a_source_with_images_but_no_label_fails_naming_what_was_looked_for(project, tmp_path):
    import dataclasses

    from visionflow.formats import read_source, write_format

    src = REAL / "roboflow-sharks-coco"
    samples = read_source("coco", src, src, "s").samples
    write_format("coco", [dataclasses.replace(s, instances=[], labels=[]) for s in samples], [], tmp_path / "bare")
    err = _cli("ingest", str(tmp_path / "bare"), "--out", "o", cwd=project, ok=False)
    assert "10 images but no label or object in any of them" in err and "read as coco" in err
    assert not (project / "o").exists()


def test_voc_coordinates_is_a_per_source_choice(project, tmp_path):
    src = REAL / "labelimg-voc-2label"  # LabelImg writes 0-based pixel coordinates
    auto = ingest(IngestParams(sources=[SourceParams(name="v", path=str(src))]), Paths(project), tmp_path / "a")
    one = ingest(IngestParams(sources=[SourceParams(name="v", path=str(src), voc_coordinates="1-based")]),
                 Paths(project), tmp_path / "b")
    assert auto["instances"] == one["instances"] == 25
    a = {s.id: s for s in read_manifest(tmp_path / "a/manifest.jsonl")}
    b = {s.id: s for s in read_manifest(tmp_path / "b/manifest.jsonl")}
    shifted = [(ia.bbox, ib.bbox) for k in a for ia, ib in zip(a[k].instances, b[k].instances)]
    assert any(x1 == bx1 + 1 for (x1, *_), (bx1, *_) in shifted if bx1 > 0)  # 1-based reads one pixel less
    with pytest.raises(ValueError, match="voc_coordinates is for format voc"):
        SourceParams(name="c", format="coco", images="x", annotations="y", voc_coordinates="1-based")


def test_cvat_segmentation_mask_export_is_read_as_masks_with_its_labelmap_colours(tmp_path):
    """CVAT's "Segmentation mask 1.1" export: JPEGImages/, SegmentationClass/ and
    SegmentationObject/ PNGs coloured by labelmap.txt, ImageSets/Segmentation/, and no
    Annotations/ (as in KirchnerMax/kcl_summerschool_23, which has no licence to vendor). Built
    here from the vendored CVAT VOC export of the same task, whose files are those plus XMLs."""
    from visionflow.formats import read_source
    from visionflow.formats.detect import detect_source
    from visionflow.manifest.masks import decode_rle

    src = REAL / "cvat-voc-1.1-2label"
    export = tmp_path / "seg-mask-1.1"
    shutil.copytree(src, export, ignore=shutil.ignore_patterns("Annotations", "Main"))
    found = detect_source(export)
    assert (found.format, found.images, found.annotations) == ("masks", export / "JPEGImages",
                                                                export / "SegmentationClass")
    result = read_source(found.format, found.images, found.annotations, "s")
    names = {c.id: c.name for c in result.categories}
    # labelmap.txt's 9 lines: its first, background, is the unlabelled region, not a category
    assert 0 not in names and names[4] == "ellipse" and len(names) == 8 and "background" not in names.values()
    assert len(result.samples) == 4 and result.report.counts.get("mask_missing") == 3  # one image was outlined
    shapes = next(s for s in result.samples if s.path.endswith("shapes.jpg"))
    ellipse = next(i for i in shapes.instances if i.category_id == 4)  # colour 0,0,128 in labelmap.txt
    pixels = np.asarray(Image.open(src / "SegmentationClass/shapes.png").convert("RGB"))
    assert np.array_equal(decode_rle(ellipse.rle, shapes.height, shapes.width, "shapes"), (pixels == [0, 0, 128]).all(-1))
    # no region for the background (black): detect gets no whole-image "background" box
    covered = np.zeros(pixels.shape[:2], bool)
    for inst in shapes.instances:
        covered |= decode_rle(inst.rle, shapes.height, shapes.width, "shapes")
    assert np.array_equal(~covered, (pixels == 0).all(-1))
