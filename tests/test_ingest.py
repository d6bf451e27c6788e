"""The ingest stage on tiny COCO sources generated in tmp_path."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from visionflow.core.config import IngestParams, SourceParams
from visionflow.core.errors import DataError
from visionflow.core.files import read_json
from visionflow.manifest import read_categories, read_manifest
from visionflow.core.paths import Paths
from visionflow.stages.ingest import ingest


def write_source(root: Path, categories: list[tuple[int, str]], images: list[dict],
                 annotations: list[dict]) -> None:
    """Images (64x64 unless given) for every image record, plus root/annotations.json."""
    for img in images:
        img.setdefault("width", 64)
        img.setdefault("height", 64)
        path = root / img["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (img["width"], img["height"]), (img["id"] * 40 % 255, 90, 160)).save(path)
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": i, "name": n, "supercategory": "thing"} for i, n in categories]}
    (root / "annotations.json").write_text(json.dumps(doc))


def ann(aid: int, image_id: int, cat: int, bbox=(4, 4, 20, 20)) -> dict:
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": list(bbox), "area": 400, "iscrowd": 0}


@pytest.fixture
def project(tmp_path) -> Paths:
    """Two sources sharing the category name "dog" under different ids."""
    write_source(tmp_path / "data/a", [(3, "cat"), (7, "dog")],
                 [{"id": 1, "file_name": "x/1.png", "labels": [7]}, {"id": 2, "file_name": "2.png"}],
                 [ann(1, 1, 7), ann(2, 2, 3), ann(3, 2, 7, bbox=(60, 60, 10, 10))])  # ann 3: clipped
    write_source(tmp_path / "data/b", [(1, "dog"), (2, "bird")],
                 [{"id": 10, "file_name": "1.png"}, {"id": 11, "file_name": "missing.png"}],
                 [ann(5, 10, 2), ann(6, 10, 1)])
    (tmp_path / "data/b/missing.png").unlink()
    return Paths(tmp_path)


def params(*, strict: bool = False, b_images: str = "data/b") -> IngestParams:
    return IngestParams(strict=strict, sources=[
        SourceParams(name="a", images="data/a", annotations="data/a/annotations.json"),
        SourceParams(name="b", images=b_images, annotations=f"{b_images}/annotations.json"),
    ])


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_ingest_merges_sources_by_category_name(project):
    result = ingest(params(), project)
    sources = result.pop("sources")
    assert result == {"samples": 3, "instances": 5, "categories": 3, "problems": 2}
    # what each source was read as and what it lost (the ingest CLI prints it, the report keeps it)
    assert [(s["name"], s["format"], s["samples"], s["problems"]) for s in sources] == [
        ("a", "coco", 2, {"box_clipped": 1}), ("b", "coco", 1, {"image_missing": 1})]
    assert sources == read_json(project.validation_report)["sources"]
    cats = read_categories(project.categories)
    assert [(c.id, c.name, c.source_ids) for c in cats] == [
        (0, "cat", {"a": 3}), (1, "dog", {"a": 7, "b": 1}), (2, "bird", {"b": 2})]
    samples = {s.id: s for s in read_manifest(project.manifest)}
    assert list(samples) == ["a/x/1.png", "a/2.png", "b/1.png"]
    assert samples["a/x/1.png"].labels == [1] and samples["a/x/1.png"].instances[0].category_id == 1
    assert [i.category_id for i in samples["a/2.png"].instances] == [0, 1]
    assert samples["a/2.png"].instances[1].bbox == [60.0, 60.0, 64.0, 64.0]
    assert [i.category_id for i in samples["b/1.png"].instances] == [2, 1]
    # root is recorded as written in params; paths resolve against the project root
    assert samples["b/1.png"].root == "data/b"
    assert samples["a/x/1.png"].image_path(project.root) == project.root / "data/a/x/1.png"


def test_validation_report(project):
    ingest(params(), project)
    report = read_json(project.validation_report)
    assert (report["samples"], report["instances"], report["categories"], report["strict"]) == (3, 5, 3, False)
    assert set(report["problems"]) == {"box_clipped", "image_missing"}
    missing = report["problems"]["image_missing"]
    assert missing["count"] == 1 and "skipped" in missing["policy"]
    assert "data/b/annotations.json" in missing["examples"][0] and "image id 11" in missing["examples"][0]
    clipped = report["problems"]["box_clipped"]["examples"][0]
    assert "data/a/annotations.json" in clipped and "annotation id 3" in clipped
    # the DVC metric: the report's numbers, flat (policies and examples stay in the report)
    assert read_json(project.validation_metrics) == {
        "samples": 3, "instances": 5, "categories": 3, "problems": 2, "strict": False,
        "problem_box_clipped": 1, "problem_image_missing": 1}


def test_sources_are_byte_identical_after_ingest(project):
    (project.root / "data/a/2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # also a corrupt file
    before = tree_hashes(project.root / "data")
    result = ingest(params(), project)
    assert result["problems"] == 2  # missing + unreadable (the clipped box went with its image)
    after = tree_hashes(project.root / "data")
    assert {k: v for k, v in after.items() if not k.startswith("processed/")} == before


def test_absolute_source_paths(project, tmp_path):
    absolute = (tmp_path / "data/b").as_posix()
    ingest(params(b_images=absolute), project)
    sample = next(s for s in read_manifest(project.manifest) if s.id == "b/1.png")
    assert sample.root == absolute and sample.image_path(Path("/elsewhere")).exists()


def test_strict_mode_fails_and_writes_nothing(project):
    with pytest.raises(DataError, match="2 problem") as err:
        ingest(params(strict=True), project)
    assert "image_missing" in str(err.value) and "box_clipped" in str(err.value)
    assert "image id 11" in str(err.value)
    assert not project.manifest.exists() and not project.validation_report.exists()


def test_failed_ingest_keeps_previous_outputs(project):
    ingest(params(), project)
    outputs = [project.manifest, project.categories, project.validation_report, project.validation_metrics]
    before = [p.read_bytes() for p in outputs]
    with pytest.raises(DataError, match="strict"):  # problems found after the first run wrote
        ingest(params(strict=True), project)
    (project.root / "data/b/annotations.json").write_text('{"images": [')
    with pytest.raises(DataError, match="invalid JSON"):
        ingest(params(), project)
    assert [p.read_bytes() for p in outputs] == before
    _only(outputs)


def test_clean_source_has_no_problems_in_strict_mode(tmp_path):
    write_source(tmp_path / "ds", [(1, "circle")], [{"id": 1, "file_name": "1.png"}], [ann(1, 1, 1)])
    paths = Paths(tmp_path)
    p = IngestParams(strict=True, sources=[SourceParams(name="s", images="ds", annotations="ds/annotations.json")])
    assert {k: v for k, v in ingest(p, paths).items() if k != "sources"} == {
        "samples": 1, "instances": 1, "categories": 1, "problems": 0}
    assert read_json(paths.validation_report)["problems"] == {}


def test_crash_while_writing_replaces_nothing(project, monkeypatch):
    ingest(params(), project)
    outputs = [project.manifest, project.categories, project.validation_report, project.validation_metrics]
    before = [p.read_bytes() for p in outputs]
    (project.root / "data/a/2.png").unlink()  # the next run would change the manifest

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("visionflow.stages.ingest.write_json", disk_full)  # the last of the three writes
    with pytest.raises(OSError, match="No space"):
        ingest(params(), project)
    assert [p.read_bytes() for p in outputs] == before
    _only(outputs)


def _only(outputs: list[Path]) -> None:
    """Each output's folder holds the outputs and nothing else (no staged temporary file left)."""
    for folder in {p.parent for p in outputs}:
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in outputs if p.parent == folder)
