"""`visionflow ingest` and `visionflow export` from the command line: a round trip."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
