"""Aspect-ratio grouping for `resize: fit` (training/loader.AspectBatchSampler): each training
batch holds landscape or portrait images only, so it is padded to its own shape and not to a
square; batches are a function of the epoch seed (exact resume, any number of workers) and
every DDP rank takes the same number of steps."""
from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from visionflow.core.config import AugmentParams, ModelParams, Params, TrainParams  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.manifest import Instance, Sample  # noqa: E402
from visionflow.stages.train import build_loaders  # noqa: E402
from visionflow.tasks.detect import DetectTask  # noqa: E402
from visionflow.training.distributed import SINGLE  # noqa: E402
from visionflow.training.loader import AspectBatchSampler, SeededSampler, orientations, sample_seed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _landscape(n: int, seed: int = 0) -> list[bool]:
    return list(np.random.default_rng(seed).random(n) < 0.6)


def _mixed(batch: list[int], landscape: list[bool]) -> bool:
    return len({landscape[i] for i in batch}) > 1


@pytest.mark.parametrize("n, b", [(37, 4), (100, 8), (9, 4)])
def test_batches_are_of_one_orientation_but_the_leftovers_and_no_sample_repeats(n, b):
    landscape = _landscape(n)
    sampler = AspectBatchSampler(landscape, b, seed=3)
    batches = sampler.batches()
    flat = [i for batch in batches for i in batch]
    assert len(flat) == len(set(flat)), "a sample twice in one epoch"
    assert all(len(batch) == b for batch in batches)
    assert n - len(flat) < b  # only the last, incomplete batch is dropped
    # the buckets' leftovers (fewer than b of each kind) make at most one mixed batch, the last
    assert sum(_mixed(batch, landscape) for batch in batches) <= 1
    assert not any(_mixed(batch, landscape) for batch in batches[:-1])
    assert len(sampler) == len(batches) == len(list(sampler))


def test_batches_follow_the_epoch_seed_only_and_items_carry_the_samples_seeds():
    landscape = _landscape(50)
    a, b = AspectBatchSampler(landscape, 4, seed=1), AspectBatchSampler(landscape, 4, seed=1)
    a.set_epoch(11)
    b.set_epoch(11)
    assert list(a) == list(b)  # a resumed run (a new sampler, the same epoch seed) sees the same batches
    first = a.batches()
    a.set_epoch(12)
    assert a.batches() != first and sorted(map(sorted, a.batches())) != sorted(map(sorted, first))
    a.set_epoch(11)
    assert a.batches() == first
    for batch in a:
        assert all(seed == sample_seed(11, 0, i) for i, seed in batch)  # what SeededSampler yields
    plain = SeededSampler(50, seed=1)
    plain.set_epoch(11)
    seeds = dict(plain)
    assert all(seeds[i] == s for batch in a for i, s in batch)  # grouped or not, a sample's seed is its own


def test_every_rank_takes_the_same_number_of_disjoint_batches():
    landscape = _landscape(83, seed=4)
    world = 3
    ranks = [AspectBatchSampler(landscape, 4, seed=5, rank=r, world_size=world) for r in range(world)]
    for r in ranks:
        r.set_epoch(9)
    got = [[[i for i, _ in batch] for batch in r] for r in ranks]
    assert len({len(g) for g in got}) == 1 and len(got[0]) == len(ranks[0]) > 0
    flat = [i for g in got for batch in g for i in batch]
    assert len(flat) == len(set(flat))
    everything = ranks[0].batches()
    for r, g in enumerate(got):
        assert g == everything[r::world]
        for batch, items in zip(g, ranks[r]):  # each rank's sample seeds name its rank
            assert [s for _, s in items] == [sample_seed(9, r, i) for i in batch]
    # fewer batches than ranks: batches repeat so that no rank is left without a step
    tiny = [AspectBatchSampler([True, False, True], 4, seed=0, rank=r, world_size=2) for r in range(2)]
    assert [len(list(t)) for t in tiny] == [1, 1]


def _write(path: Path, image: np.ndarray) -> str:
    Image.fromarray(image).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _photos(root: Path, n: int) -> list[Sample]:
    """n photos, landscape (120x90) and portrait (60x100) in turn, one box each."""
    rng = np.random.default_rng(2)
    out = []
    for i in range(n):
        h, w = (90, 120) if i % 3 else (100, 60)
        image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        image[10:40, 10:40] = (230, 30, 30)
        sha = _write(root / f"p{i}.png", image)
        out.append(Sample(id=f"p{i}", root=str(root), path=f"p{i}.png", width=w, height=h, sha256=sha,
                          instances=[Instance(bbox=[10, 10, 40, 40], category_id=0)]))
    return out


def _params(**kw) -> TrainParams:
    return TrainParams(model=ModelParams(arch="fasterrcnn", backbone="mobilenet_v2", backbone_weights=None,
                                         width=0.25), image_size=64, batch_size=4, resize="fit",
                       augment=AugmentParams(preset="none"), device="cpu", **kw)


def _batches(params: TrainParams, samples: list[Sample], root: Path, val: bool = False) -> list[tuple[tuple, list]]:
    """One epoch of the real train loader (or the val loader, on the same samples)."""
    task = DetectTask(params)
    train_tf, eval_tf = task.build_transforms(params)
    train_ds = task.build_dataset(samples, train_tf, root)
    val_ds = task.build_dataset(samples, eval_tf, root)
    loader, val_loader, sampler = build_loaders(task, params, Paths(root), train_ds, val_ds, torch.device("cpu"),
                                                SINGLE)
    sampler.set_epoch(4)
    return [(tuple(x.shape), x, y) for x, y in (val_loader if val else loader)]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_train_loader_pads_each_batch_to_its_own_orientation_and_a_detector_trains_on_it(tmp_path, workers):
    samples = _photos(tmp_path, 24)
    grouped = _batches(_params(num_workers=workers), samples, tmp_path)
    shapes = Counter(shape for shape, _, _ in grouped)
    # 16 landscape (64 x 48) and 8 portrait (38 x 64) photos: four and two batches of 4, none square
    assert shapes == {(4, 3, 48, 64): 4, (4, 3, 64, 38): 2}, shapes
    plain = _batches(_params(num_workers=workers, aspect_grouping=False), samples, tmp_path)
    assert (4, 3, 64, 64) in {shape for shape, _, _ in plain}  # what grouping saves: square padding
    if workers:  # the same batches, pixel for pixel, as without workers
        for (_, x0, y0), (_, x2, y2) in zip(_batches(_params(num_workers=0), samples, tmp_path), grouped):
            assert torch.equal(x0, x2) and all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(y0, y2))
    # validation batches each orientation apart too, every image once
    val = _batches(_params(num_workers=workers), samples, tmp_path, val=True)
    assert Counter(shape for shape, _, _ in val) == {(4, 3, 48, 64): 4, (4, 3, 64, 38): 2}
    task = DetectTask(_params())
    model = task.build_model(_params(), num_classes=2, pretrained=False).train()
    for shape, x, targets in grouped[:1] + [g for g in grouped if g[0][2] == 64][:1]:  # a landscape and a portrait batch
        losses = task.loss(model, x, targets)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values()), shape


def test_aspect_grouping_is_on_with_fit_and_refused_elsewhere():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw["detect"]["train"]["aspect_grouping"] is None
    raw["detect"]["train"]["resize"] = "fit"
    assert Params.model_validate(raw).detect.train.aspect_grouping is None  # on: fit's default
    raw["detect"]["train"]["aspect_grouping"] = False
    assert Params.model_validate(raw).detect.train.aspect_grouping is False
    raw["detect"]["train"].update(resize="letterbox", aspect_grouping=True)
    with pytest.raises(Exception, match="detect.train.aspect_grouping: grouping batches by orientation is for "
                                        "resize: fit"):
        Params.model_validate(raw)


def test_orientations_are_the_manifests_width_and_height():
    def s(w, h):
        return Sample(id="x", root=".", path="x.png", width=w, height=h, sha256="0")

    assert orientations([s(640, 480), s(480, 640), s(500, 500)]) == [True, False, True]


def test_prediction_batches_each_orientation_apart_under_fit_and_keeps_the_images_order(tmp_path):
    from visionflow.deploy.predictor import ModelPredictor

    images = [np.zeros((h, w, 3), np.uint8) for h, w in ((90, 160), (160, 90), (90, 160), (100, 100), (160, 90))]
    predictor = ModelPredictor.__new__(ModelPredictor)
    predictor.resize = "fit"
    assert predictor.batches(images, 2) == [[0, 2], [3], [1, 4]]
    predictor.resize = "letterbox"
    assert predictor.batches(images, 2) == [[0, 1], [2, 3], [4]]


def test_the_gates_parity_check_feeds_the_export_the_batches_prediction_makes(tmp_path):
    """A Faster R-CNN trained with fit, exported to TorchScript: parity on photos of both
    orientations (one chunk of 5, so prediction makes a landscape and a portrait batch) holds
    to the gate's tolerance; fed one mixed batch, the export would see other padding."""
    import json

    from visionflow.deploy import export
    from visionflow.deploy.parity import check_parity
    from visionflow.deploy.predictor import META_FILE, MODEL_FILE

    params = TrainParams(model=ModelParams(arch="fasterrcnn", backbone="mobilenet_v2", backbone_weights=None,
                                           width=0.25, score_threshold=0.0, detections_per_image=5),
                         image_size=64, resize="fit", augment=AugmentParams(preset="none"))
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.save(DetectTask(params).build_model(params, 2, pretrained=False).state_dict(), model_dir / MODEL_FILE)
    (model_dir / META_FILE).write_text(json.dumps({"task": "detect", "arch": "fasterrcnn", "num_classes": 2,
                                                   "classes": ["a", "b"], "image_size": 64,
                                                   "params": params.model_dump(mode="json")}))
    info = export.export_model(model_dir, "torchscript", tmp_path / "model.pt")
    samples = _photos(tmp_path, 5)
    assert sorted(orientations(samples)) == [False, False, True, True, True]
    result = check_parity(model_dir, info["path"], samples, tmp_path, batch_size=5)
    assert result["within_tolerance"], result
    assert result["n"] == 5 and result["mismatched_images"] == 0
