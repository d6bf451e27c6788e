"""Detect task: every detector trains and predicts, targets follow their objects through
augmentation, predictions come back in the input image's pixels, weights load offline only."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from visionflow.core.config import ARCHS, AugmentParams, ModelParams, TrainParams
from visionflow.models.detectors import FAMILIES, build_detector, is_mask_arch
from visionflow.core.errors import UserError
from visionflow.evaluation.coco import evaluate_coco
from visionflow.manifest.masks import decode_rle, encode_rle
from visionflow.manifest import Instance, Sample
from visionflow.tasks.detect import (DetectTask, coco_ground_truth, detection_results, gt_annotations,
                                     has_masks)

S = 64
RED, GREEN, BLUE = (230, 30, 30), (30, 200, 30), (40, 40, 230)
task = DetectTask()


def rect(x1, y1, x2, y2, category, crowd=False, rle_size=None) -> Instance:
    if rle_size:  # the same rectangle as an RLE instance
        mask = np.zeros(rle_size, dtype=bool)
        mask[y1:y2, x1:x2] = True
        return Instance(bbox=[x1, y1, x2, y2], category_id=category, rle=encode_rle(mask), iscrowd=crowd)
    return Instance(bbox=[x1, y1, x2, y2], category_id=category, polygons=[[x1, y1, x2, y1, x2, y2, x1, y2]],
                    iscrowd=crowd)


def write_sample(root, name, instances, colours, size=(S, S)) -> Sample:
    """A grey image with each instance's box filled in its colour."""
    h, w = size
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    for inst, colour in zip(instances, colours):
        x1, y1, x2, y2 = (int(v) for v in inst.bbox)
        image[y1:y2, x1:x2] = colour
    Image.fromarray(image).save(root / name)
    return Sample(id=name, root=str(root), path=name, width=w, height=h, sha256="0", instances=list(instances))


@pytest.fixture
def samples(tmp_path):
    return [
        write_sample(tmp_path, "objects.png", [rect(6, 8, 30, 28, 0), rect(34, 30, 58, 60, 1, rle_size=(S, S)),
                                               rect(40, 2, 60, 20, 1, crowd=True)], [RED, GREEN, BLUE]),
        write_sample(tmp_path, "empty.png", [], []),
    ]


def params(arch="fasterrcnn", augment=None, **model) -> TrainParams:
    if arch in FAMILIES:  # the compact MobileNet variant keeps the tests fast
        model = {"backbone": "mobilenet_v2", "width": 0.5, **model}
    return TrainParams(model=ModelParams(arch=arch, detections_per_image=5, **model), image_size=S,
                       augment=augment or AugmentParams(preset="none"))


def batch(train_params, samples, train=True):
    transform = task.build_transforms(train_params)[0 if train else 1]
    dataset = task.build_dataset(samples, transform, project_root=samples[0].root)
    return task.collate([dataset[i] for i in range(len(dataset))])


@pytest.mark.parametrize("arch", ARCHS["detect"])
def test_every_arch_trains_one_step_and_predicts(arch, samples):
    p = params(arch)
    model = task.build_model(p, num_classes=2, pretrained=False)
    images, targets = batch(p, samples)  # an image with objects and an empty one
    model.train()
    losses = task.loss(model, images, targets)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and total > 0
    assert ("loss_mask" in losses) == is_mask_arch(arch) == has_masks(model)
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in model.parameters())

    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    [pred] = task.predict(model, [image], task.build_transforms(p)[1], torch.device("cpu"))
    assert model.training  # predict leaves the mode as it found it
    assert len(pred["boxes"]) == len(pred["labels"]) == len(pred["scores"]) <= 5
    assert pred["scores"] == sorted(pred["scores"], reverse=True)
    assert all(0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 48 for x1, y1, x2, y2 in pred["boxes"])
    assert set(pred["labels"]) <= {0, 1}
    assert ("masks" in pred) == is_mask_arch(arch)
    for rle in pred.get("masks", []):
        assert decode_rle(rle, 48, 80, "pred").shape == (48, 80)


def test_dataset_targets_and_a_batch_with_an_empty_image_trains(samples):
    p = params("maskrcnn")
    images, targets = batch(p, samples)
    assert images.shape == (2, 3, S, S) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    objects, empty = targets
    assert objects["labels"].tolist() == [1, 2]  # category + 1; the crowd instance is left out
    assert torch.allclose(objects["boxes"], torch.tensor([[6., 8, 30, 28], [34, 30, 58, 60]]))
    assert objects["masks"].shape == (2, S, S) and objects["masks"].dtype == torch.uint8
    assert objects["masks"].sum((1, 2)).tolist() == [24 * 20, 24 * 30]  # polygon and RLE rasterised
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64
    assert empty["masks"].shape == (0, S, S) and empty["masks"].dtype == torch.uint8

    model = task.build_model(p, num_classes=2, pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = task.loss(model, images, targets)
    sum(losses.values()).backward()
    optimizer.step()
    assert all(torch.isfinite(v) for v in losses.values())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("roi_heads.mask_head") for k in changed) and any(k.startswith("backbone") for k in changed)


def test_box_only_architectures_get_no_masks_and_the_same_images_and_boxes(samples):
    """A task made from a box-only architecture's params builds datasets without instance masks
    (each was an (S, S) plane decompressed, augmented and batched every epoch for `loss` to
    drop); a mask architecture's, and a task without params, with them. The masks change no draw:
    images, boxes and labels are the same bit for bit, with geometric steps, for every seed."""
    geometric = AugmentParams(transforms=[{"name": "HorizontalFlip", "p": 0.5},
                                          {"name": "Affine", "scale": (0.8, 1.2), "rotate": (-30, 30), "p": 0.8},
                                          {"name": "RandomBrightnessContrast", "p": 0.5}])
    boxes_only, with_masks = params("fasterrcnn", geometric), params("maskrcnn", geometric)
    assert not DetectTask(boxes_only).carries_masks and DetectTask(with_masks).carries_masks and task.carries_masks
    transform = task.build_transforms(boxes_only)[0]
    plain = DetectTask(boxes_only).build_dataset(samples, transform, samples[0].root)
    masked = DetectTask(with_masks).build_dataset(samples, transform, samples[0].root)
    assert "masks" not in plain.record(0) and masked.record(0)["masks"].shape == (2, S, S)
    for seed in range(16):
        for i in range(len(samples)):
            (x, y), (x_m, y_m) = plain[(i, seed)], masked[(i, seed)]
            assert set(y) == {"boxes", "labels"} and set(y_m) == {"boxes", "labels", "masks"}
            assert torch.equal(x, x_m) and torch.equal(y["boxes"], y_m["boxes"]), (seed, i)
            assert torch.equal(y["labels"], y_m["labels"]) and len(y_m["masks"]) == len(y["boxes"])

    images, targets = DetectTask(boxes_only).collate([plain[(i, 3)] for i in range(len(samples))])
    model = task.build_model(boxes_only, num_classes=2, pretrained=False)
    losses = task.loss(model, images, targets)  # a box-only model trains on them
    assert losses and all(torch.isfinite(v) for v in losses.values())
    mask_model = task.build_model(with_masks, num_classes=2, pretrained=False)
    with pytest.raises(RuntimeError, match="without instance masks"):
        task.loss(mask_model, images, targets)


def _mask_box(mask: torch.Tensor) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def test_boxes_and_masks_stay_on_their_objects_through_augmentation(samples):
    geometric = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5},
                 {"name": "Affine", "scale": (0.8, 1.2), "rotate": (-30, 30), "translate_percent": (-0.1, 0.1), "p": 1.0}]
    p = params(augment=AugmentParams(transforms=geometric, min_box_area=0, min_visibility=0))
    transform = task.build_transforms(p)[0]
    dataset = task.build_dataset(samples[:1], transform, samples[0].root)
    colour = {1: RED, 2: GREEN}
    boxes = []
    for seed in range(8):  # the key (index, seed) seeds the draws the dataset makes; seeding
        image, target = dataset[(0, seed)]  # `transform` would not: the dataset runs a copy of its steps
        boxes.append(target["boxes"])
        pixels = image.permute(1, 2, 0).numpy() * 255
        for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"]):
            assert np.allclose(box, _mask_box(mask.numpy()), atol=2.0), (seed, box, _mask_box(mask.numpy()))
            inside = pixels[mask.numpy().astype(bool)].mean(0)  # the mask covers its object's colour
            assert np.abs(inside - colour[label]).max() < 40, (seed, label, inside)
    # the same eight draws every run (it once failed 2 runs in 7 when they were not), and eight
    # different ones
    assert torch.equal(dataset[(0, 3)][1]["boxes"], boxes[3])
    assert len({tuple(b.flatten().tolist()) for b in boxes}) == 8


def test_masks_stay_aligned_when_filtering_drops_boxes(tmp_path):
    # Crop the left 40 columns: B keeps 6/26 of its width (visibility < 0.5), C is 2x2 < min_area.
    instances = [rect(34, 4, 60, 20, 0), rect(4, 4, 20, 30, 1), rect(24, 40, 26, 42, 2), rect(10, 40, 36, 60, 3)]
    sample = write_sample(tmp_path, "crowded.png", instances, [BLUE, RED, BLUE, GREEN])
    crop = [{"name": "Crop", "x_min": 0, "y_min": 0, "x_max": 40, "y_max": S}]
    p = params(augment=AugmentParams(transforms=crop, min_box_area=10, min_visibility=0.5))
    image, target = task.build_dataset([sample], task.build_transforms(p)[0], tmp_path)[0]
    assert target["labels"].tolist() == [2, 4]
    assert target["masks"].shape == (2, S, 40)
    for box, mask in zip(target["boxes"].tolist(), target["masks"].numpy()):
        assert box == _mask_box(mask)


def _upscale(image: np.ndarray, fy: int, fx: int) -> np.ndarray:
    return np.repeat(np.repeat(image, fy, axis=0), fx, axis=1)


def test_predictions_are_in_the_original_image_pixels(samples):
    # stretch (letterbox: tests/test_letterbox.py)
    p = params("maskrcnn", score_threshold=0.0).model_copy(update={"resize": "stretch"})
    torch.manual_seed(0)  # the random init decides how large the masks are: same model every run
    model = task.build_model(p, num_classes=2, pretrained=False).eval()
    image = np.asarray(Image.open(samples[0].image_path()))
    # Stretching a pixel-repeated image back to S x S gives the very same model input (bilinear
    # between equal neighbours), so the predictions may differ only by the output scaling.
    small, wide = task.predict(model, [image, _upscale(image, 1, 2)], task.build_transforms(p)[1], torch.device("cpu"))
    [big] = task.predict(model, [_upscale(image, 2, 2)], task.build_transforms(p)[1], torch.device("cpu"))
    assert len(small["boxes"]) > 0
    for other, scale in ((wide, [2, 1, 2, 1]), (big, [2, 2, 2, 2])):
        assert other["labels"] == small["labels"]
        assert np.allclose(other["scores"], small["scores"], atol=1e-5)
        assert np.allclose(other["boxes"], np.asarray(small["boxes"]) * scale, atol=1e-2)
    for m_small, m_big in zip(small["masks"], big["masks"]):
        a, b = decode_rle(m_small, S, S, "small"), decode_rle(m_big, 2 * S, 2 * S, "big")
        up = _upscale(a, 2, 2)  # nearest vs the bilinear upsampling of predict: edges differ
        assert (up & b).sum() >= 0.8 * (up | b).sum()  # both empty (an untrained mask head) agrees too


def test_batched_predict_equals_one_by_one(samples):
    p = params("fcos", score_threshold=0.0)
    model = task.build_model(p, num_classes=2, pretrained=False).eval()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((64, 64, 3), (40, 90, 3), (100, 30, 3))]
    transform, cpu = task.build_transforms(p)[1], torch.device("cpu")
    together = task.predict(model, images, transform, cpu)
    for image, pred in zip(images, together):
        [alone] = task.predict(model, [image], transform, cpu)
        assert alone["labels"] == pred["labels"]
        assert np.allclose(alone["scores"], pred["scores"], atol=1e-5)
        assert np.allclose(alone["boxes"], pred["boxes"], atol=1e-3)


def _outputs(model, images):
    model.eval()
    with torch.no_grad():
        return model(list(images))


def test_whole_model_weights_from_a_file_round_trip(samples, tmp_path, caplog):
    p = params("retinanet", backbone="resnet18", width=1.0, score_threshold=0.0)
    trained = task.build_model(p, num_classes=2, pretrained=False)
    images, targets = batch(p, samples)
    sum(task.loss(trained, images, targets).values()).backward()
    torch.optim.SGD(trained.parameters(), lr=0.01).step()  # weights and BatchNorm statistics move
    path = tmp_path / "detector.pt"
    torch.save(trained.state_dict(), path)

    with caplog.at_level(logging.INFO, logger="visionflow.models.detectors"):
        loaded = build_detector(p.model.model_copy(update={"weights": str(path)}), S, 2)
    [line] = [r.getMessage() for r in caplog.records if r.name == "visionflow.models.detectors"]
    assert str(path) in line
    a, b = _outputs(trained, images[:1]), _outputs(loaded, images[:1])
    assert len(a[0]["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.allclose(a[0][key].float(), b[0][key].float(), atol=1e-4)

    # Another number of classes (as COCO weights are for 91): all but the class head is loaded.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visionflow.models.detectors"):
        wider = build_detector(p.model.model_copy(update={"weights": str(path)}), S, 4)
    assert "class heads re-initialised" in caplog.records[-1].getMessage()
    saved = torch.load(path, weights_only=True)
    for k, v in wider.state_dict().items():
        if k.startswith("head.classification_head.cls_logits"):
            assert v.shape[0] == 5 * 9 and v.shape != saved[k].shape
        elif not k.endswith("num_batches_tracked"):
            assert torch.equal(v, saved[k]), k


def test_pretrained_false_ignores_weights_and_says_so_at_debug_level(caplog):
    p = params(weights="missing.pt", backbone_weights="IMAGENET1K_V1")
    with caplog.at_level(logging.DEBUG, logger="visionflow.models.detectors"):
        task.build_model(p, num_classes=2, pretrained=False)
    [record] = [r for r in caplog.records if r.name == "visionflow.models.detectors"]
    # rebuilding a trained model is not "random initialisation": that line would mislead at INFO
    assert "architecture only" in record.getMessage() and record.levelno == logging.DEBUG


def test_backbone_weights_missing_from_the_cache_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    p = params(backbone_weights="IMAGENET1K_V1", width=1.0)
    with pytest.raises(UserError, match="never downloads") as err:
        task.build_model(p, num_classes=2)
    assert "backbone_weights" in str(err.value) and str(tmp_path / "torch") in str(err.value)
    assert not (tmp_path / "torch").exists()  # nothing was fetched


def test_backbone_weights_from_a_file_are_loaded(tmp_path, caplog):
    import torchvision

    reference = torchvision.models.mobilenet_v2(width_mult=0.5)
    path = tmp_path / "mnv2.pth"
    torch.save(reference.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="visionflow.models.detectors"):
        model = task.build_model(params(backbone_weights=str(path), trainable_backbone_layers=2), num_classes=2)
    assert str(path) in caplog.records[-1].getMessage()
    body = model.backbone.body
    assert torch.equal(body["0"][0].weight, reference.features[0][0].weight)
    assert not body["0"][0].weight.requires_grad and body["18"][0].weight.requires_grad


class Oracle(torch.nn.Module):
    """A stand-in detector that returns given outputs, in loader order."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.roi_heads = list(outputs), self.Heads()

    class Heads(torch.nn.Module):
        def has_mask(self) -> bool:
            return True

    def forward(self, images):
        assert not self.training
        return [self.outputs.pop(0) for _ in images]


def _as_outputs(targets, shift=0.0):
    return [{"boxes": t["boxes"] + shift, "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
             "masks": t["masks"][:, None].float()} for t in targets]


def test_val_metrics_of_perfect_detections_are_one(samples):
    p = params("maskrcnn")
    loader = [batch(p, samples, train=False)]
    model = Oracle(_as_outputs(loader[0][1])).train()
    metrics = task.val_metrics(model, loader, torch.device("cpu"))
    assert metrics == pytest.approx({"val_map": 1.0, "val_map50": 1.0, "val_mask_map": 1.0, "val_mask_map50": 1.0})
    assert model.training  # left as the engine had it

    # The same helpers score a detection shifted off its object below 1.
    targets = loader[0][1]
    gt = coco_ground_truth([(S, S)] * 2, [a for n, t in enumerate(targets) for a in gt_annotations(t, n + 1, True)])
    shifted = [d for n, o in enumerate(_as_outputs(targets, shift=12.0)) for d in detection_results(o, n + 1, True)]
    assert evaluate_coco(gt, shifted, "bbox")["AP50"] < 1.0
