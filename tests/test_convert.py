"""`visionflow ingest` and `visionflow export` from the command line: a round trip."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

from visionflow.datasets.synth import render_dataset  # noqa: E402
from visionflow.formats import read_source  # noqa: E402
from visionflow.manifest import read_manifest, read_split  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402


def _cli(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "visionflow.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture
def ingested(tmp_path):
    make_project(tmp_path)
    render_dataset(tmp_path / "ext", n=10, size=48, seed=5)
    _cli("ingest", "--format", "coco", "--images", "ext", "--annotations", "ext/annotations.json", "--name", "ext",
         cwd=tmp_path)
    _cli("stage", "split", cwd=tmp_path)
    return tmp_path


def test_ingest_command_builds_the_manifest(ingested):
    samples = read_manifest(Paths(ingested).manifest)
    assert len(samples) == 10 and all(s.id.startswith("ext/images/") for s in samples)


@pytest.mark.parametrize("command", ["export-annotations", "export"])  # the old name stays an alias
def test_export_round_trip_of_one_split(ingested, command):
    paths = Paths(ingested)
    out = _cli(command, "--format", "coco", "--out", "exported", "--split", "test", cwd=ingested)
    assert "losses: none" in out
    test_ids = set(read_split(paths.split_file)["test"])
    before = {s.path: s for s in read_manifest(paths.manifest) if s.id in test_ids}
    back = read_source("coco", ingested / "exported", ingested / "exported/annotations.json", "ext").samples
    assert {s.path for s in back} == set(before)
    for s in back:
        ref = before[s.path]
        assert s.sha256 == ref.sha256 and (s.width, s.height) == (ref.width, ref.height)
        assert len(s.instances) == len(ref.instances)
        for a, b in zip(s.instances, ref.instances):
            assert a.category_id == b.category_id and a.bbox == pytest.approx(b.bbox, rel=1e-6)
    report = json.loads((ingested / "exported/conversion_report.json").read_text())
    assert report["lossless"] and report["samples"] == len(test_ids)


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "visionflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_ingest_never_overwrites_the_pipeline_manifest_unasked(ingested):
    paths = Paths(ingested)
    render_dataset(ingested / "other", n=4, size=48, seed=9)
    source = ("ingest", "--format", "coco", "--images", "other", "--annotations", "other/annotations.json",
              "--name", "other")
    before = paths.manifest.read_bytes()

    refused = _run(*source, cwd=ingested)
    assert refused.returncode == 2 and refused.stdout == "", refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {Paths(Path('.')).manifest} exists (the pipeline's manifest): write this source elsewhere with --out DIR, "
        "or replace the manifest with --force"]
    assert paths.manifest.read_bytes() == before

    out = _run(*source, "--out", "data/other", cwd=ingested)  # where the user says
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"wrote {(ingested / 'data/other/manifest.jsonl').resolve()}" in out.stdout
    other = read_manifest(ingested / "data/other/manifest.jsonl")
    assert len(other) == 4 and all(s.id.startswith("other/") for s in other)
    assert (ingested / "data/other/categories.json").is_file() and (ingested / "data/other/validation.json").is_file()
    assert paths.manifest.read_bytes() == before

    forced = _run(*source, "--force", cwd=ingested)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert [s.id for s in read_manifest(paths.manifest)] == [s.id for s in other]


# format -> (images root, annotations) of an export folder, as a user would point `ingest` at it
READ_BACK = {"coco": (".", "annotations.json"), "yolo": (".", "data.yaml"), "voc": ("JPEGImages", "."),
             "cvat": ("images", "annotations.xml"), "labelstudio": (".", "tasks.json"),
             "imagefolder": (".", "."), "csv": (".", "."), "masks": ("images", "masks")}


@pytest.mark.parametrize("fmt", sorted(READ_BACK))
def test_every_format_keeps_the_project_split(ingested, fmt):
    """The split stage's assignment (not the source's) is written in every format, and the
    format's reader gives it back (what split.keep_existing then honours)."""
    split = {sid: name for name, ids in read_split(Paths(ingested).split_file).items() for sid in ids}
    by_image = {s.sha256: split[s.id] for s in read_manifest(Paths(ingested).manifest)}
    assert set(by_image.values()) == {"train", "val", "test"}
    out = _cli("export", "--format", fmt, "--out", f"exp-{fmt}", cwd=ingested)
    counts = {k: list(by_image.values()).count(k) for k in ("test", "train", "val")}
    assert f"(splits: test {counts['test']}, train {counts['train']}, val {counts['val']};" in out
    images, annotations = READ_BACK[fmt]
    back = read_source(fmt, ingested / f"exp-{fmt}" / images, ingested / f"exp-{fmt}" / annotations, "back").samples
    assert {s.sha256: s.attributes.get("split") for s in back} == by_image


def test_yolo_export_keeps_the_split_and_reingests_equal(ingested, tmp_path):
    paths = Paths(ingested)
    split = {sid: name for name, ids in read_split(paths.split_file).items() for sid in ids}
    before = {s.sha256: s for s in read_manifest(paths.manifest)}
    _cli("export", "--format", "yolo", "--out", "yolo", cwd=ingested)
    data = yaml.safe_load((ingested / "yolo/data.yaml").read_text())
    assert {k: data[k] for k in ("train", "val", "test")} == {k: f"images/{k}" for k in ("train", "val", "test")}
    for s in before.values():  # images/<split>/ and labels/<split>/
        name = Path(s.path).name
        assert (ingested / "yolo/images" / split[s.id] / name).is_file()
        assert (ingested / "yolo/labels" / split[s.id] / name).with_suffix(".txt").is_file()

    # a new project reads the export with split.keep_existing: the same split, the same boxes
    other = tmp_path / "other"
    make_project(other, {"split": {"keep_existing": True}, "ingest": {"sources": [
        {"name": "back", "format": "yolo", "images": str(ingested / "yolo"),
         "annotations": str(ingested / "yolo/data.yaml")}]}})
    for stage in ("ingest", "split"):
        _cli("stage", stage, cwd=other)
    back_split = {sid: name for name, ids in read_split(Paths(other).split_file).items() for sid in ids}
    back = read_manifest(Paths(other).manifest)
    assert {s.sha256: back_split[s.id] for s in back} == {h: split[s.id] for h, s in before.items()}
    for s in back:
        ref = before[s.sha256]
        assert [i.category_id for i in s.instances] == [i.category_id for i in ref.instances]
        for a, b in zip(s.instances, ref.instances):
            assert a.bbox == pytest.approx(b.bbox, abs=1e-3)

    # --split S: that split only, and a data.yaml that names only it
    _cli("export", "--format", "yolo", "--split", "test", "--out", "yolo-test", cwd=ingested)
    data = yaml.safe_load((ingested / "yolo-test/data.yaml").read_text())
    assert data["test"] == "images/test" and "train" not in data and "val" not in data
    assert sorted(p.name for p in (ingested / "yolo-test/images").iterdir()) == ["test"]
    written = {p.name for p in (ingested / "yolo-test/images/test").iterdir()}
    assert written == {Path(s.path).name for s in before.values() if split[s.id] == "test"}
