"""The promotion gate on a real MLflow registry for a segmenter (mIoU, per-class IoU, ONNX parity).

test_promote.py covers the gate's decisions on classifiers; this module runs the same decisions
through the segment path end to end: a tiny U-Net is trained by the real train stage on
images whose class is the colour of a square, evaluated and registered by the real stages.
"Good" is that model; "bad" is the same weights with the head's class channels rotated
(background kept), so every square is painted as the wrong class. The gate predicts both on
the test split through the registered versions, scores mIoU with its bootstrap, and checks
the candidate's ONNX export.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient  # tests read the registry directly; src/ goes through tracking
from PIL import Image

from visionflow.core.config import EvaluateParams, ModelParams, RegisterParams, TrainParams
from visionflow.core.files import read_json
from visionflow.manifest import Category, Instance, Sample, write_categories, write_manifest, write_split
from visionflow.core.paths import Paths
from visionflow.stages.promote import PromoteParams, promote
from visionflow.stages.evaluate import evaluate
from visionflow.stages.register import register
from visionflow.stages.train import train

sys.path.insert(0, str(Path(__file__).parent))
from test_promote import alias_version, aliases  # noqa: E402  (the same alias helpers)

CLASSES = ["red", "green", "blue"]
COLOURS = [(220, 40, 40), (40, 200, 40), (50, 60, 230)]
SIZE, SIDE = 32, 14
TRAIN = TrainParams(model=ModelParams(arch="unet", backbone=None, backbone_weights=None, width=0.25),
                    image_size=SIZE, epochs=40, batch_size=8, lr=0.01, warmup_epochs=0, dice_weight=1.0,
                    augment={"preset": "none"}, early_stopping=None)


# This module's models train on one thread, as they always have: the figures its tests check
# were made so (restored after the module: conftest.one_thread_module).
pytestmark = pytest.mark.usefixtures("one_thread_module")


def make_data(root: Path) -> None:
    """48 noisy dark 32x32 images, each with one 14x14 square whose colour is its class;
    24 train, 6 val, 18 test."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    samples = []
    for i in range(48):
        c = i % 3
        pixels = rng.normal(30, 12, (SIZE, SIZE, 3))
        x, y = (int(v) for v in rng.integers(0, SIZE - SIDE, 2))
        pixels[y:y + SIDE, x:x + SIDE] = np.array(COLOURS[c]) + rng.normal(0, 12, (SIDE, SIDE, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        square = [float(v) for v in (x, y, x + SIDE, y, x + SIDE, y + SIDE, x, y + SIDE)]
        samples.append(Sample(id=f"s/{i:02d}", root="images", path=f"{i}.png", width=SIZE, height=SIZE,
                              sha256=f"{i:064x}", labels=[c],
                              instances=[Instance(bbox=[x, y, x + SIDE, y + SIDE], category_id=c,
                                                  polygons=[square], area=float(SIDE * SIDE))]))
    paths = Paths(root, task="segment")
    write_manifest(paths.manifest, samples)
    write_categories(paths.categories, [Category(k, n) for k, n in enumerate(CLASSES)])
    ids = [s.id for s in samples]
    write_split(paths.split_file, {"train": ids[:24], "val": ids[24:30], "test": ids[30:]}, seed=0)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Versions 1 (good), 2 (bad: class channels rotated) and 3 (good again) of one model."""
    root = tmp_path_factory.mktemp("promote-segment") / "project"
    make_data(root)
    paths = Paths(root, task="segment")
    # good_copy: the same weights registered as a version of its own (for the tie)
    reg = RegisterParams(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", model_name="promo-seg", reuse_identical=False)
    train(TRAIN, paths)
    good = torch.load(paths.model_dir / "model.pt", weights_only=True)
    bad = dict(good)
    for key in ("head.weight", "head.bias"):  # channel 0 is background; rotate 1..K
        bad[key] = torch.cat([good[key][:1], good[key][1:].roll(1, 0)])
    versions, miou = {}, {}
    for name, state in (("good", good), ("bad", bad), ("good_copy", good)):
        torch.save(state, paths.model_dir / "model.pt")
        miou[name] = evaluate(EvaluateParams(batch_size=16, grid_images=2), paths)["miou"]
        versions[name] = register(reg, paths)["version"]
    # The premise: the trained model paints the squares right, its rotation paints them wrong.
    assert miou["good"] > 0.8 and miou["bad"] < 0.4, miou
    return paths, reg, versions, miou


def test_first_segmenter_is_promoted_on_the_floor_with_onnx_parity(registry):
    paths, reg, v, miou = registry
    names = aliases(reg, "first", v["good"])
    result = promote(PromoteParams(floor=0.6, **names), reg, paths)
    assert result["decision"] == "promoted" and result["champion"] is None
    assert result["primary"]["metric"] == "miou"
    assert result["primary"]["candidate"] == pytest.approx(miou["good"], abs=5e-5)  # the gate = the evaluate stage (4 digits)
    export = result["export"]
    assert export["status"] == "checked" and export["passed"] and export["format"] == "onnx"
    assert export["max_abs_diff"] <= 1e-3 and export["metric_export"] == pytest.approx(export["metric_torch"], abs=1e-3)
    # the checked ONNX file is attached to the version: in its run under exported/, and tagged
    client = MlflowClient(reg.tracking_uri, reg.tracking_uri)
    mv = client.get_model_version(reg.model_name, v["good"])
    assert export["artifact_uri"] == mv.tags["export.uri"] == mv.tags["promotion.export_uri"]
    assert export["artifact_uri"] == f"runs:/{mv.run_id}/exported/segment.onnx"
    assert {a.path for a in client.list_artifacts(mv.run_id, "exported")} == {"exported/segment.onnx",
                                                                               "exported/segment.onnx.json"}
    assert mv.tags["export.format"] == "onnx" and mv.tags["export.within_tolerance"] == "true"
    assert mv.tags["export.parity_on"] == "18 test images" and len(mv.tags["export.sha256"]) == 64
    assert alias_version(reg, "first-champion") == v["good"]
    assert read_json(paths.promotion)["decision"] == "promoted"
    description = client.get_model_version(reg.model_name, v["good"]).description
    table = [line for line in description.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 1 + 4 + 2  # header, rule, mIoU, IoU of background + 3 classes, floor, export
    for line in table:  # six columns in every row, as the MLflow UI renders them ("max |diff|" escaped)
        assert len(re.findall(r"(?<!\\)\|", line)) == 7, line
    assert table[-1].startswith("| export max \\|diff\\| | - | ") and table[-1].endswith(" | pass |")


def test_worse_segmenter_is_refused_and_says_which_classes_dropped(registry):
    paths, reg, v, miou = registry
    names = aliases(reg, "worse", v["bad"], champion=v["good"])
    result = promote(PromoteParams(require_export=False, **names), reg, paths)
    assert result["decision"] == "refused"
    p = result["primary"]
    assert p["delta"] == pytest.approx(miou["bad"] - miou["good"], abs=1e-4)
    assert p["ci_high"] < -0.3  # every test image is worse: the whole interval is far below 0
    failed = {c["check"] for c in result["checks"] if not c["passed"]}
    assert failed == {"non_inferiority", "per_class"}  # floor 0 by default: only the comparison fails
    per_class = result["per_class"]
    assert set(per_class) == {"background", *CLASSES}
    assert all(per_class[c]["delta"] < -0.5 for c in CLASSES)  # every square painted as another class
    assert abs(per_class["background"]["delta"]) < 1e-9  # the rotation left background alone
    assert "per_class (IoU dropped" in result["reason"]
    assert alias_version(reg, "worse-champion") == v["good"] and alias_version(reg, "worse-candidate") == v["bad"]
    tags = MlflowClient(reg.tracking_uri, reg.tracking_uri).get_model_version(reg.model_name, v["bad"]).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.champion_version"] == v["good"]


def test_better_segmenter_is_promoted_and_an_identical_one_ties(registry):
    paths, reg, v, miou = registry
    names = aliases(reg, "better", v["good"], champion=v["bad"])
    result = promote(PromoteParams(require_export=False, **names), reg, paths)
    assert result["decision"] == "promoted" and result["primary"]["ci_low"] > 0.3
    assert alias_version(reg, "better-champion") == v["good"]

    names = aliases(reg, "tie", v["good_copy"], champion=v["good"])
    tie = promote(PromoteParams(margin=0.0, per_class_margin=0.0, require_export=False, **names), reg, paths)
    assert (tie["primary"]["delta"], tie["primary"]["ci_low"], tie["primary"]["ci_high"]) == (0.0, 0.0, 0.0)
    assert tie["decision"] == "promoted" and alias_version(reg, "tie-champion") == v["good_copy"]
