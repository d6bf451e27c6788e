"""Batch prediction with detect and segment models: COCO results JSON (boxes, or per-class RLE
masks), JSONL, the CSV refusal, and `--fiftyone DATASET` on FiftyOne's real database."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

from visionflow.core.config import load_params  # noqa: E402
from visionflow.manifest.masks import decode_rle  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-dense")
    params_file = make_project(root, {"synth": {"n": 24}}, name="pdense", tasks=("detect", "segment"))
    params = load_params(params_file)
    for name in ("synth", "ingest", "split", "train-detect", "train-segment"):
        get_stage(name, params).run(params, Paths(root))
    return root


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "visionflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_detect_writes_coco_results_and_refuses_csv(project):
    images = project / "data/shapes/images"
    out = project / "det.json"
    res = _cli("predict", "--model", "models/detect", "--images", str(images), "--out", str(out), cwd=project)
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads(out.read_text())
    n_images = len(list(images.iterdir()))
    assert {r["image_id"] for r in results} <= set(range(1, n_images + 1))
    for r in results:
        assert len(r["bbox"]) == 4 and r["bbox"][2] >= 0 and r["bbox"][3] >= 0
        assert 0 <= r["score"] <= 1 and 0 <= r["category_id"] < 5 and r["file_name"].startswith(str(images))
    # the file is a valid COCO results list for our evaluator, against the matching ground truth
    from visionflow.evaluation.coco import evaluate_coco

    gt = json.loads((project / "data/shapes/annotations.json").read_text())
    ids = {str(project / "data/shapes" / im["file_name"]): im["id"] for im in gt["images"]}
    remapped = [{**r, "image_id": ids[r["file_name"]], "category_id": r["category_id"] + 1} for r in results]
    assert 0 <= evaluate_coco(gt, remapped, "bbox")["AP50"] <= 1
    bad = _cli("predict", "--model", "models/detect", "--images", str(images), "--out", str(project / "d.csv"),
               cwd=project)
    assert bad.returncode == 2 and "COCO results (.json) or JSON lines" in bad.stderr


def test_segment_jsonl_masks_and_fiftyone_dataset(project):
    import fiftyone as fo

    images = project / "data/shapes/images"
    out = project / "seg.jsonl"
    res = _cli("predict", "--model", "models/segment", "--images", str(images), "--out", str(out),
               "--fiftyone", "pdense-seg-preds", cwd=project)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(list(images.iterdir()))
    for row in rows:
        h, w = row["height"], row["width"]
        masks = {int(v): decode_rle(rle, h, w, "test") for v, rle in row["mask_rle"].items()}
        assert sorted(masks) == row["classes_present"]
        # per-class masks never overlap: each pixel has one class
        assert np.sum([m.astype(int) for m in masks.values()], axis=0).max(initial=0) <= 1
    ds = fo.load_dataset("pdense-seg-preds")
    assert len(ds) == len(rows) and ds.info["task"] == "segment"
    assert ds.default_mask_targets[0] == "background"
    assert ds.app_config.active_fields.paths == ["predictions"]  # masks drawn when the App opens
    scheme = ds.app_config.color_scheme  # one colour per class, not one per field
    colours = {c["intTarget"]: c["color"] for c in scheme.default_mask_targets_colors}
    assert scheme.color_by == "value" and sorted(colours) == sorted(k for k in ds.default_mask_targets if k)
    assert len(set(colours.values())) == len(colours)
    first = ds.first()
    assert first.predictions.mask.shape == (rows[0]["height"], rows[0]["width"])
