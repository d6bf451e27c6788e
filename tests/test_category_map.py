"""Per-source category mapping: rename, merge several into one, drop with null."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_ingest import ann, write_source  # noqa: E402

from visionflow.core.config import IngestParams, SourceParams  # noqa: E402
from visionflow.core.errors import DataError  # noqa: E402
from visionflow.core.files import read_json  # noqa: E402
from visionflow.manifest import read_categories, read_manifest  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.stages.ingest import ingest  # noqa: E402


@pytest.fixture
def paths(tmp_path) -> Paths:
    write_source(tmp_path / "data/a", [(1, "car"), (2, "truck"), (3, "tree")],
                 [{"id": 1, "file_name": "1.png", "labels": [2]}, {"id": 2, "file_name": "2.png", "labels": [3]}],
                 [ann(1, 1, 1), ann(2, 1, 2), ann(3, 2, 3)])
    write_source(tmp_path / "data/b", [(5, "Vehicle")], [{"id": 1, "file_name": "1.png"}], [ann(1, 1, 5)])
    return Paths(tmp_path)


def _params(mapping_a, mapping_b=None, strict=False) -> IngestParams:
    return IngestParams(strict=strict, sources=[
        SourceParams(name="a", images="data/a", annotations="data/a/annotations.json", categories=mapping_a),
        SourceParams(name="b", images="data/b", annotations="data/b/annotations.json", categories=mapping_b),
    ])


def test_rename_merge_and_drop(paths):
    summary = ingest(_params({"car": "vehicle", "truck": "vehicle", "tree": None}, {"Vehicle": "vehicle"}), paths)
    cats = read_categories(paths.categories)
    assert [c.name for c in cats] == ["vehicle"]
    assert cats[0].source_ids == {"a": 1, "b": 5}
    by_id = {s.id: s for s in read_manifest(paths.manifest)}
    assert [i.category_id for i in by_id["a/1.png"].instances] == [0, 0]  # car and truck merged
    assert by_id["a/1.png"].labels == [0]
    assert by_id["a/2.png"].instances == [] and by_id["a/2.png"].labels == []  # tree dropped
    assert [i.category_id for i in by_id["b/1.png"].instances] == [0]
    report = read_json(paths.validation_report)["problems"]["category_dropped"]
    assert report["count"] == 2 and "a/2.png" in report["examples"][0]
    assert summary["categories"] == 1


def test_intentional_drops_do_not_fail_strict_mode(paths):
    ingest(_params({"tree": None}, strict=True), paths)
    assert [c.name for c in read_categories(paths.categories)] == ["car", "truck", "Vehicle"]


def test_unknown_source_category_is_an_error(paths):
    with pytest.raises(DataError, match=r"ingest.sources\[a\].categories names \['lorry'\]") as err:
        ingest(_params({"lorry": "vehicle"}), paths)
    assert "car" in str(err.value) and "params.yaml" in str(err.value)
    assert not paths.manifest.exists()
