"""The promotion gate on a real MLflow (one temporary sqlite store for the module).

Models are tiny but real: a random-init resnet18 whose head is either fitted to the data (a
least-squares probe on its features: accuracy 1 on the test split) or scrambled (the rows of
the fitted head rotated: every test image gets the wrong class). Each is registered through
the register stage, so the gate reads exactly what the pipeline writes; each test points its
own aliases at those versions.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from visionflow import cli
from visionflow.integrations import mlflow as tracking
import mlflow_readback as readback  # noqa: E402  (tests/)
from visionflow.core.config import RegisterParams, TrainParams
from visionflow.core.errors import UserError
from visionflow.evaluation.coco import evaluate_coco, match_table
from visionflow.evaluation.segmentation import ConfusionAccumulator
from visionflow.manifest.images import load_rgb
from visionflow.core.files import file_digest, read_json, write_json
from visionflow.manifest import (Category, Sample, read_manifest, samples_in_split, write_categories,
                                 write_manifest, write_split)
from visionflow.core.paths import Paths
from visionflow.stages import promote as promote_module
from visionflow.evaluation.coco import weighted_ap
from visionflow.stages.promote import PromoteParams, bootstrap_diff, confidence_interval, promote, report_path
from visionflow.tasks.segment import mean_iou
from visionflow.stages.register import register
from visionflow.tasks.classify import ClassifyTask

CLASSES = ["red", "green", "blue"]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
TRAIN = TrainParams(image_size=32, epochs=1, augment={"preset": "none"})
NO_EXPORT = {"require_export": False}


# This module's models train on one thread, as they always have: the figures its tests check
# were made so (restored after the module: conftest.one_thread_module).
pytestmark = pytest.mark.usefixtures("one_thread_module")


# --- a registered-model project ---------------------------------------------------------------

def make_data(root: Path) -> list[Sample]:
    """36 noisy 24x24 images of three colours; 12 train the probe, 24 are the test split."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    samples = []
    for i in range(36):
        c = i % 3
        pixels = np.clip(np.array(COLOURS[c]) + rng.normal(0, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        samples.append(Sample(id=f"s/{i:02d}", root="images", path=f"{i}.png", width=24, height=24,
                              sha256=f"{i:064x}", labels=[c]))
    paths = Paths(root)
    write_manifest(paths.manifest, samples)
    write_categories(paths.categories, [Category(k, n) for k, n in enumerate(CLASSES)])
    ids = [s.id for s in samples]
    write_split(paths.split_file, {"train": ids[:12], "val": [], "test": ids[12:]}, seed=0)
    return samples


def make_project(root: Path) -> tuple[Paths, RegisterParams]:
    """Data, split and every file the register stage reads except model.pt."""
    paths = Paths(root)
    make_data(root)
    paths.model_dir.mkdir(parents=True)
    write_json(paths.model_dir / "meta.json", {
        "task": "classify", "arch": "resnet18", "num_classes": len(CLASSES), "classes": CLASSES, "image_size": 32,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "params": TRAIN.model_dump(mode="json")})
    write_json(paths.model_dir / "augment.json", A.to_dict(A.Compose([A.Resize(32, 32), A.Normalize()])))
    write_json(paths.train_metrics, {"best_epoch": 1, "epochs_run": 1})
    paths.train_history.parent.mkdir(parents=True, exist_ok=True)
    paths.train_history.write_text("epoch,train_loss\n1,1.0\n")
    write_json(paths.eval_metrics, {"accuracy": 0.0, "top_k_accuracy": 0.0, "k": 1, "macro_f1": 0.0, "n": 24})
    paths.figures_dir.mkdir(parents=True)
    return paths, RegisterParams(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", model_name="promo-test")


def fitted_weights(paths: Paths) -> dict[str, dict[str, torch.Tensor]]:
    """{"good": the head fitted to the 12 train images, "bad": its rows rotated} state dicts."""
    from visionflow.models.classifiers import build_classifier

    torch.manual_seed(0)
    model = build_classifier("resnet18", len(CLASSES), None, "full", 2).eval()
    transform = ClassifyTask().build_transforms(TRAIN)[1]
    train = samples_in_split(read_manifest(paths.manifest), paths.split_file, "train")
    x = torch.from_numpy(np.stack([transform(image=load_rgb(s.image_path(paths.root)))["image"].transpose(2, 0, 1)
                                   for s in train]))  # (12, 3, 32, 32)
    head, model.fc = model.fc, torch.nn.Identity()
    with torch.no_grad():
        feats = model(x)  # (12, 512)
    model.fc = head
    targets = torch.nn.functional.one_hot(torch.tensor([s.labels[0] for s in train]), len(CLASSES)).float() * 10
    solution = torch.linalg.lstsq(torch.cat([feats, torch.ones(len(feats), 1)], 1), targets).solution  # (513, K)
    good = {**model.state_dict(), "fc.weight": solution[:-1].T.contiguous(), "fc.bias": solution[-1].contiguous()}
    bad = {**good, "fc.weight": good["fc.weight"].roll(1, 0), "fc.bias": good["fc.bias"].roll(1, 0)}
    return {"good": good, "bad": bad}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One store, one registered model with four versions; each test points its own aliases at
    them (PromoteParams.alias_from / alias_to), so tests do not see each other's decisions."""
    paths, reg = make_project(tmp_path_factory.mktemp("promote") / "project")
    reg = reg.model_copy(update={"reuse_identical": False})  # good_copy: the same weights as a version of its own
    weights = fitted_weights(paths)
    versions = {}
    for key, state in (("good", "good"), ("bad", "bad"), ("good_copy", "good"), ("bad_copy", "bad")):
        torch.save(weights[state], paths.model_dir / "model.pt")
        versions[key] = register(reg, paths)["version"]
    return paths, reg, versions


def aliases(reg: RegisterParams, name: str, candidate: str, champion: str | None = None) -> dict[str, str]:
    """Point `<name>-candidate` (and `<name>-champion`) at versions; -> PromoteParams alias keywords."""
    tracking.set_alias(reg.model_name, f"{name}-candidate", candidate, reg.tracking_uri)
    if champion:
        tracking.set_alias(reg.model_name, f"{name}-champion", champion, reg.tracking_uri)
    return {"alias_from": f"{name}-candidate", "alias_to": f"{name}-champion"}


def alias_version(reg: RegisterParams, alias: str) -> str | None:
    found = tracking.find_version_by_alias(reg.model_name, alias, reg.tracking_uri)
    return found and found["version"]


def version_info(reg: RegisterParams, version: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(reg.tracking_uri, reg.tracking_uri).get_model_version(reg.model_name, version)


# --- first model ever: the floor decides --------------------------------------------------------

def test_first_model_above_the_floor_is_promoted(registry):
    paths, reg, v = registry
    names = aliases(reg, "first-good", v["good"])
    result = promote(PromoteParams(floor=0.9, **names, **NO_EXPORT), reg, paths)
    assert result["decision"] == "promoted" and result["promoted"] and result["champion"] is None
    assert result["primary"]["candidate"] == 1.0 and result["primary"]["delta"] is None
    assert [c["check"] for c in result["checks"]] == ["floor", "export"]
    assert result["export"] == {"status": "skipped", "passed": True,
                                "detail": "skipped (promote.require_export: false)"}
    assert alias_version(reg, "first-good-champion") == v["good"]
    assert read_json(report_path(paths)) == result


def test_first_model_below_the_floor_is_refused(registry):
    paths, reg, v = registry
    names = aliases(reg, "first-bad", v["bad"])
    result = promote(PromoteParams(floor=0.5, **names, **NO_EXPORT), reg, paths)
    assert result["decision"] == "refused" and result["primary"]["candidate"] == 0.0
    assert result["reason"] == "failed: floor (accuracy 0.0000 must be >= 0.5000)"
    assert alias_version(reg, "first-bad-champion") is None
    tags = version_info(reg, v["bad"]).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.champion_version"] == "none"


# --- candidate against a champion -------------------------------------------------------------

def test_worse_candidate_is_refused_with_the_evidence_recorded(registry):
    paths, reg, v = registry
    names = aliases(reg, "worse", v["bad"], champion=v["good"])
    result = promote(PromoteParams(**names, **NO_EXPORT), reg, paths)

    assert result["decision"] == "refused" and not result["promoted"]
    p = result["primary"]
    assert (p["champion"], p["candidate"], p["delta"]) == (1.0, 0.0, -1.0)
    assert p["ci_low"] == p["ci_high"] == -1.0  # every image flips: no resample can say otherwise
    failed = {c["check"] for c in result["checks"] if not c["passed"]}
    assert failed == {"non_inferiority", "per_class"}
    assert "non_inferiority (" in result["reason"] and "per_class (F1 dropped" in result["reason"]
    assert all(c["delta"] == -1.0 for c in result["per_class"].values())
    # the champion is unchanged; the candidate keeps its version and alias
    assert alias_version(reg, "worse-champion") == v["good"] and alias_version(reg, "worse-candidate") == v["bad"]

    mv = version_info(reg, v["bad"])
    tags = mv.tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.reason"] == result["reason"]
    assert tags["promotion.champion_version"] == v["good"] and tags["promotion.primary_delta"] == "-1.0000"
    assert tags["promotion.ci_low"] == "-1.0000" and tags["promotion.checks"] == (
        "non_inferiority=fail per_class=fail floor=pass export=pass")
    assert tags["promotion.data.manifest_md5"] == file_digest(paths.manifest, "md5")
    assert tags["promotion.data.split_md5"] == file_digest(paths.split_file, "md5")
    assert mv.description.startswith("**Promotion decision: refused**")
    assert "| accuracy | 1.0000 | 0.0000 | -1.0000 | [-1.0000, -1.0000] | FAIL |" in mv.description

    run = readback.get_run(tags["promotion.run_id"], reg.tracking_uri)
    assert run["tags"]["mlflow.runName"] == f"promote-classify-v{v['bad']}"
    # decisions live in their own experiment: the training runs table holds training runs only
    assert run["experiment_id"] == tracking.experiment_id(f"{reg.experiment}-promotions", reg.tracking_uri)
    assert run["experiment_id"] != readback.get_run(mv.run_id, reg.tracking_uri)["experiment_id"]
    assert run["metrics"]["delta"] == -1.0 and run["metrics"]["promoted"] == 0.0
    assert run["metrics"]["candidate_accuracy"] == 0.0 and run["metrics"]["champion_accuracy"] == 1.0
    assert run["params"]["margin"] == "0.02" and run["params"]["champion_version"] == v["good"]
    artifact = readback.download_artifacts(tags["promotion.run_id"], "promotion.json", reg.tracking_uri,
                                           paths.root / "downloaded")
    assert read_json(artifact)["reason"] == result["reason"]


def test_better_candidate_is_promoted_and_the_old_champion_keeps_its_version(registry):
    paths, reg, v = registry
    names = aliases(reg, "better", v["good"], champion=v["bad"])
    result = promote(PromoteParams(**names, **NO_EXPORT), reg, paths)

    assert result["decision"] == "promoted" and result["primary"]["delta"] == 1.0
    assert result["primary"]["ci_low"] == 1.0 and result["reason"].startswith("all checks passed")
    assert alias_version(reg, "better-champion") == alias_version(reg, "better-candidate") == v["good"]
    previous = version_info(reg, v["bad"])  # still there, marked superseded
    assert previous.tags["promotion.superseded_by"] == v["good"] and "better-champion" not in previous.aliases
    assert version_info(reg, v["good"]).tags["promotion.decision"] == "promoted"


def test_a_tie_passes_non_inferiority_and_is_decided_by_the_other_checks(registry):
    """docs/promotion.md: identical predictions give delta 0 and CI [0, 0], which is not worse
    by any margin (even margin 0); the tie is promoted exactly when the other checks pass."""
    paths, reg, v = registry
    names = aliases(reg, "tie", v["good_copy"], champion=v["good"])
    tie = promote(PromoteParams(margin=0.0, per_class_margin=0.0, floor=1.0, **names, **NO_EXPORT), reg, paths)
    assert (tie["primary"]["delta"], tie["primary"]["ci_low"], tie["primary"]["ci_high"]) == (0.0, 0.0, 0.0)
    assert all(c["delta"] == 0.0 for c in tie["per_class"].values())
    assert tie["decision"] == "promoted" and alias_version(reg, "tie-champion") == v["good_copy"]

    names = aliases(reg, "tie-low", v["bad_copy"], champion=v["bad"])
    refused = promote(PromoteParams(margin=0.0, floor=0.5, **names, **NO_EXPORT), reg, paths)
    assert (refused["primary"]["delta"], refused["primary"]["ci_low"]) == (0.0, 0.0)
    assert {c["check"]: c["passed"] for c in refused["checks"]} == {
        "non_inferiority": True, "per_class": True, "floor": False, "export": True}
    assert refused["decision"] == "refused" and alias_version(reg, "tie-low-champion") == v["bad"]


def test_export_parity_is_a_check_when_required(registry):
    paths, reg, v = registry
    names = aliases(reg, "export", v["good"])
    result = promote(PromoteParams(**names), reg, paths)
    export = result["export"]
    if importlib.util.find_spec("visionflow.deploy.export") is None:  # the gate must work with or without it
        assert export["status"] == "not available" and not export["passed"]
        assert result["decision"] == "refused" and "export (export parity: not available" in result["reason"]
    else:  # the candidate as exported predicts what PyTorch predicts on the test split
        assert export["status"] == "checked" and export["n"] == 24 and export["passed"]
        assert export["max_abs_diff"] <= 1e-3 and export["metric_export"] == export["metric_torch"] == 1.0
        assert result["decision"] == "promoted"
        assert version_info(reg, v["good"]).tags["promotion.export"] == "checked"


def test_already_champion_is_a_no_op(registry):
    paths, reg, v = registry
    names = aliases(reg, "again", v["good"], champion=v["good"])
    result = promote(PromoteParams(**names, **NO_EXPORT), reg, paths)
    assert result["decision"] == "already_champion" and result["promoted"] and result["checks"] == []
    assert alias_version(reg, "again-champion") == v["good"]


def test_a_champion_trained_on_other_classes_is_not_compared(registry):
    paths, reg, v = registry
    meta = read_json(paths.model_dir / "meta.json")
    try:
        write_json(paths.model_dir / "meta.json", {**meta, "classes": ["a", "b", "c"]})
        torch.save(torch.load(paths.model_dir / "model.pt", weights_only=True), paths.model_dir / "model.pt")
        other = register(reg, paths)["version"]
    finally:
        write_json(paths.model_dir / "meta.json", meta)
    result = promote(PromoteParams(floor=0.9, **aliases(reg, "relabelled", v["good"], champion=other), **NO_EXPORT),
                     reg, paths)
    assert "differ from the data's" in result["champion"]["not_compared"]
    assert result["primary"]["champion"] is None and [c["check"] for c in result["checks"]] == ["floor", "export"]
    assert result["decision"] == "promoted" and alias_version(reg, "relabelled-champion") == v["good"]


def test_user_errors(registry, tmp_path):
    paths, reg, v = registry
    missing = RegisterParams(tracking_uri=f"sqlite:///{tmp_path / 'none.db'}", model_name="x")
    with pytest.raises(UserError, match="no MLflow store"):
        promote(PromoteParams(), missing, paths)
    assert not (tmp_path / "none.db").exists()
    with pytest.raises(UserError, match="registered model 'other' not found"):
        promote(PromoteParams(), reg.model_copy(update={"model_name": "other"}), paths)
    with pytest.raises(UserError, match="no version with alias 'nowhere'"):
        promote(PromoteParams(alias_from="nowhere"), reg, paths)
    categories = paths.categories.read_bytes()
    try:
        write_categories(paths.categories, [Category(k, n) for k, n in enumerate(["a", "b", "c"])])
        with pytest.raises(UserError, match="classes .* differ from the data's"):
            promote(PromoteParams(**aliases(reg, "classes", v["good"])), reg, paths)
    finally:
        paths.categories.write_bytes(categories)


# --- the command line ---------------------------------------------------------------------------

@pytest.fixture
def cli_params(registry) -> Path:
    """params.yaml in the project whose classify branch registers into the shared store."""
    from project import make_project as write_params

    paths, reg, _ = registry
    params_file = write_params(paths.root)
    raw = yaml.safe_load(params_file.read_text())
    raw["classify"]["register"].update(tracking_uri=reg.tracking_uri, model_name=reg.model_name)
    raw["classify"]["promote"] = NO_EXPORT
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return params_file


def test_cli_exit_codes_and_table(registry, cli_params, capsys):
    """The default aliases: only this test uses `candidate` -> `champion`."""
    paths, reg, v = registry
    argv = ["promote", "--task", "classify", "--params", str(cli_params)]
    assert cli.main(["promote", "--task", "segment", "--params", str(cli_params)]) == 2
    assert "no 'segment' branch" in capsys.readouterr().err
    tracking.set_alias(reg.model_name, "candidate", v["good"], reg.tracking_uri)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"candidate v{v['good']} vs no champion on 24 test images" in out and "decision: PROMOTED" in out
    assert alias_version(reg, "champion") == v["good"]

    tracking.set_alias(reg.model_name, "candidate", v["bad"], reg.tracking_uri)
    assert cli.main(argv) == 3
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("metric"))
    assert out[header].split() == ["metric", "champion", "candidate", "delta", "95%", "CI", "verdict"]
    assert out[header + 1].split() == ["accuracy", "1.0000", "0.0000", "-1.0000", "[-1.0000,", "-1.0000]", "FAIL"]
    assert out[header + 2].split() == ["F1", "red", "1.0000", "0.0000", "-1.0000", "-", "FAIL"]
    assert out[-1].startswith("decision: REFUSED: failed: non_inferiority")
    assert alias_version(reg, "champion") == v["good"]


# --- detect and segment scorers on real (random-init) models -----------------------------------

DENSE = {"detect": {"model": {"arch": "fasterrcnn", "backbone": "mobilenet_v2", "width": 0.25}, "image_size": 64},
         "segment": {"model": {"arch": "unet", "width": 0.25}, "image_size": 64}}


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_dense_scorers_give_their_point_estimate_at_unit_weights(task, tmp_path):
    from visionflow.datasets.synth import render_dataset
    from visionflow.formats.coco import read_coco
    from visionflow.tasks import get_task

    render_dataset(tmp_path / "shapes", n=4, size=64)
    data = read_coco(tmp_path / "shapes", tmp_path / "shapes" / "annotations.json", "shapes")
    index = {c.id: k for k, c in enumerate(data.categories)}  # source ids -> 0..K-1, as ingest does
    for s in data.samples:
        for inst in s.instances:
            inst.category_id = index[inst.category_id]
    categories = [Category(k, c.name) for k, c in enumerate(data.categories)]
    train = TrainParams(**DENSE[task])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.manual_seed(0)
    model = get_task(task).build_model(train, len(categories), pretrained=False)
    torch.save(model.state_dict(), model_dir / "model.pt")
    write_json(model_dir / "meta.json", {"task": task, "num_classes": len(categories), "image_size": 64,
                                         "classes": [c.name for c in categories],
                                         "params": train.model_dump(mode="json")})

    scored = promote_module.score_model(model_dir, data.samples, tmp_path, categories)
    names = {c.name for c in categories} | ({"background"} if task == "segment" else set())
    assert 0 <= scored.value <= 1 and scored.per_class and set(scored.per_class) <= names
    assert scored.resample(np.ones((1, 4)))[0] == pytest.approx(scored.value, abs=1e-12)
    resampled = scored.resample(np.array([[4.0, 0, 0, 0], [0, 2.0, 2.0, 0]]))
    assert resampled.shape == (2,) and np.all((resampled >= 0) & (resampled <= 1))


# --- statistics ---------------------------------------------------------------------------------

def _mean_of(scores: np.ndarray):
    return lambda w: w @ scores / len(scores)


def test_bootstrap_ci_covers_a_known_difference_and_is_reproducible():
    rng = np.random.default_rng(1)
    n, truth = 400, 0.1
    champion = rng.random(n) < 0.7  # per-image correctness
    flip_up = ~champion & (rng.random(n) < truth / 0.3)  # fixes ~10% of images net, paired
    candidate = (champion | flip_up).astype(float)
    observed = candidate.mean() - champion.mean()
    diffs = bootstrap_diff(_mean_of(candidate), _mean_of(champion.astype(float)), n, 2000, seed=7)
    low, high = confidence_interval(diffs)
    assert low < truth < high and low < observed < high and low > 0
    # the same seed gives the same interval; another seed a slightly different one
    again = bootstrap_diff(_mean_of(candidate), _mean_of(champion.astype(float)), n, 2000, seed=7)
    assert np.array_equal(again, diffs) and confidence_interval(again) == (low, high)
    other = bootstrap_diff(_mean_of(candidate), _mean_of(champion.astype(float)), n, 2000, seed=8)
    assert not np.array_equal(other, diffs) and abs(confidence_interval(other)[0] - low) < 0.02


def test_bootstrap_ci_has_about_95_percent_coverage():
    rng = np.random.default_rng(3)
    n, truth, hits, trials = 200, 0.05, 0, 200
    for t in range(trials):
        a = rng.normal(0.5, 0.2, n)
        b = a + truth + rng.normal(0, 0.1, n)  # paired per-image scores, mean difference `truth`
        low, high = confidence_interval(bootstrap_diff(_mean_of(b), _mean_of(a), n, 400, seed=t))
        hits += low <= truth <= high
    assert 0.90 <= hits / trials <= 0.99


def _synthetic_detection(rng, n_images=12, n_classes=3):
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 100, "height": 100})
        for _ in range(rng.integers(0, 4)):
            x, y, w, h = (float(v) for v in rng.uniform(0, 60, 4))
            c = int(rng.integers(n_classes))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w + 5, h + 5],
                         "area": (w + 5) * (h + 5), "iscrowd": int(rng.random() < 0.1)})
            if rng.random() < 0.8:  # a jittered, sometimes mislabelled detection
                j = rng.normal(0, 4, 4)
                dets.append({"image_id": i, "category_id": c if rng.random() < 0.8 else int(rng.integers(n_classes)),
                             "bbox": [x + j[0], y + j[1], w + 5 + j[2], h + 5 + j[3]], "score": float(rng.random())})
        for _ in range(rng.integers(0, 3)):  # false positives
            dets.append({"image_id": i, "category_id": int(rng.integers(n_classes)),
                         "bbox": [float(v) for v in rng.uniform(0, 80, 4)], "score": float(rng.random())})
    categories = [{"id": c, "name": f"c{c}"} for c in range(n_classes)]
    return {"images": images, "annotations": anns, "categories": categories}, dets


def test_weighted_ap_equals_coco_on_the_resampled_images():
    rng = np.random.default_rng(0)
    gt, dt = _synthetic_detection(rng)
    table = match_table(gt, dt)
    ones = weighted_ap(table, np.ones((1, 12)))[0]
    expected = evaluate_coco(gt, dt, "bbox", curves=True)["per_class_ap50"]
    np.testing.assert_allclose(ones, [v if v >= 0 else np.nan for v in expected.values()], rtol=0, atol=1e-12)

    pick = rng.integers(0, 12, 12)  # one bootstrap resample, written out as its own dataset
    images, anns, dets = [], [], []
    for new_id, old in enumerate(pick, 1):
        images.append({**gt["images"][old], "id": new_id})
        anns += [{**a, "id": len(anns) + k + 1, "image_id": new_id}
                 for k, a in enumerate(a for a in gt["annotations"] if a["image_id"] == old + 1)]
        dets += [{**d, "image_id": new_id} for d in dt if d["image_id"] == old + 1]
    resampled = evaluate_coco({**gt, "images": images, "annotations": anns}, dets, "bbox", curves=True)
    counts = np.bincount(pick, minlength=12)[None].astype(float)
    np.testing.assert_allclose(weighted_ap(table, counts)[0],
                               [v if v >= 0 else np.nan for v in resampled["per_class_ap50"].values()], atol=1e-12)


def test_weighted_miou_equals_the_accumulator_on_the_resampled_images():
    rng = np.random.default_rng(0)
    K, masks = 4, [(rng.integers(0, 4, (8, 8)), rng.integers(0, 4, (8, 8))) for _ in range(6)]
    cms = []
    for pred, truth in masks:
        acc = ConfusionAccumulator(K)
        acc.update(pred, truth)
        cms.append(acc.matrix.ravel())
    pick = rng.integers(0, 6, 6)
    acc = ConfusionAccumulator(K)
    for i in pick:
        acc.update(*masks[i])
    weights = np.bincount(pick, minlength=6)[None].astype(float)
    assert mean_iou((weights @ np.stack(cms)).reshape(-1, K, K))[0] == pytest.approx(acc.compute()["miou"], abs=1e-12)


def test_a_rerun_with_nothing_changed_keeps_the_decision_on_record(registry):
    """promotion.json is a DVC output: asking the same question again (same candidate, champion,
    gate params and test data) leaves the file and the registry as they were, whether the
    answer was a refusal or a promotion; a changed question is decided again."""
    paths, reg, v = registry
    names = aliases(reg, "rerun", v["bad"], champion=v["good"])
    first = promote(PromoteParams(**names, **NO_EXPORT), reg, paths)
    recorded = paths.promotion.read_bytes()
    again = promote(PromoteParams(**names, **NO_EXPORT), reg, paths)
    assert again["decision"] == first["decision"] == "refused" and again["run"]["id"] == first["run"]["id"]
    assert paths.promotion.read_bytes() == recorded
    changed = promote(PromoteParams(margin=0.5, **names, **NO_EXPORT), reg, paths)  # another question
    assert changed["run"]["id"] != first["run"]["id"] and paths.promotion.read_bytes() != recorded

    names = aliases(reg, "rerun-ok", v["good"])
    promoted = promote(PromoteParams(**names, **NO_EXPORT), reg, paths)
    recorded = paths.promotion.read_bytes()
    assert promoted["decision"] == "promoted"
    again = promote(PromoteParams(**names, **NO_EXPORT), reg, paths)  # now candidate == champion
    assert again["decision"] == "already_champion" and again["promoted"]
    assert paths.promotion.read_bytes() == recorded
