"""Aspect-true resizing (train.resize: letterbox | stretch) for detect and segment: boxes and
masks go into the S x S model input and come back to each input's own pixels exactly, through
the train-time transforms, predict and the export path; letterbox padding is ignored by the
segmentation loss and metrics; stretch and model folders trained before the field behave as before."""
from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from visionflow.core.config import AugmentParams, ModelParams, TrainParams
from visionflow.deploy import export
from visionflow.deploy.predictor import MODEL_FILE, load_predictor
from visionflow.manifest import Category, Instance, Sample
from visionflow.manifest.masks import IGNORE, encode_rle
from visionflow.tasks import get_task
from visionflow.tasks.base import IGNORE_INDEX
from visionflow.tasks.detect import DetectionsGraph, DetectTask
from visionflow.tasks.segment import LogitsMaskGraph, SegmentTask
from visionflow.training.augment import build_eval_transform, build_train_transform, input_frame, resize_steps
from visionflow.training.loader import split_transform

from project import write_model_folder

CPU = torch.device("cpu")
RED = (230, 30, 30)
# (H, W, S): the issue's 1920x1080 landscape and 480x1280 portrait photos; S divides each image's
# longest side, so a box on that grid lands on whole model-input pixels and a thresholded model
# input gives back the drawn box exactly.
PHOTOS = [(1080, 1920, 240), (1280, 480, 320)]


pytestmark = pytest.mark.usefixtures("one_thread_seeded")


def detect_params(resize="letterbox", size=64, **model) -> TrainParams:
    return TrainParams(model=ModelParams(arch="fasterrcnn", backbone="mobilenet_v2", backbone_weights=None, width=0.25,
                                         detections_per_image=5, **model),
                       image_size=size, resize=resize, augment=AugmentParams(preset="none"))


def segment_params(resize="letterbox", size=64) -> TrainParams:
    return TrainParams(model=ModelParams(arch="unet", backbone=None, backbone_weights=None, width=0.25),
                       image_size=size, resize=resize, augment=AugmentParams(preset="none"))


def photo(h: int, w: int, box) -> np.ndarray:
    """A grey h x w photo with the xyxy box filled red."""
    image = np.full((h, w, 3), 128, np.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    image[y1:y2, x1:x2] = RED
    return image


def photo_box(h: int, w: int, s: int) -> list[float]:
    """An off-centre box on the photo's s-grid (whole model-input pixels after the resize)."""
    step = max(h, w) // s
    return [float(v * step) for v in (s // 7, s // 9, s // 3, s // 2)] if w >= h else \
        [float(v * step) for v in (s // 20, s // 5, s // 5, s // 2)]


# --- the geometry ------------------------------------------------------------------------------

def test_letterbox_steps_and_frame_of_the_issues_photos():
    tf = build_eval_transform(256, normalize=False, resize="letterbox")
    assert [type(t).__name__ for t in tf.transforms] == ["LongestMaxSize", "PadIfNeeded", "Normalize"]
    wide, tall = input_frame(tf, 1080, 1920), input_frame(tf, 1280, 480)
    assert (wide.rows, wide.cols, wide.top, wide.left) == (144, 256, 56, 0)
    assert (tall.rows, tall.cols, tall.top, tall.left) == (256, 96, 0, 80)
    # the frame is where the image's pixels really are: all else is padding (0)
    for (h, w), frame in (((1080, 1920), wide), ((1280, 480), tall)):
        out = tf(image=np.full((h, w, 3), 200, np.uint8))["image"]
        assert out.shape == (256, 256, 3)
        content = np.zeros((256, 256), bool)
        content[frame.top:frame.top + frame.rows, frame.left:frame.left + frame.cols] = True
        assert (out[..., 0][content] > 0.7).all() and (out[..., 0][~content] == 0).all()
    stretch = input_frame(build_eval_transform(256), 1080, 1920)
    assert (stretch.rows, stretch.cols, stretch.top, stretch.left) == (256, 256, 0, 0)


@pytest.mark.parametrize("h, w", [(1080, 1920), (1280, 480)])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("resize", ["letterbox", "fit"])
def test_a_box_round_trips_through_the_train_and_eval_transforms(h, w, train, resize):
    box = [101.3, 57.9, 433.4, 1002.2] if w < h else [733.1, 57.9, 1811.6, 1002.2]
    tf = (build_train_transform("none", None, 256, normalize=False, boxes=True, resize=resize) if train else
          build_eval_transform(256, normalize=False, boxes=True, resize=resize))
    out = tf(image=np.zeros((h, w, 3), np.uint8), bboxes=np.array([box], np.float32), labels=[1], instance_ids=[0])
    frame = input_frame(tf, h, w)
    moved = np.asarray(out["bboxes"], np.float64)
    assert np.abs(moved - frame.to_input(np.array([box]))).max() < 1e-3
    assert np.abs(frame.to_image(moved) - np.array([box])).max() < 1.0  # within 1 px: in fact ~1e-4


@pytest.mark.parametrize("h, w, s", PHOTOS)
def test_the_same_box_through_predict_and_through_the_exported_graph(h, w, s):
    """A detector that finds the red pixels of its input: predict (eval transform, model,
    to_prediction) and the export path (preprocess, graph, exported_predictions) both give the
    drawn box back in the photo's pixels."""
    box = photo_box(h, w, s)
    image = photo(h, w, box)
    task, params = DetectTask(), detect_params(size=s)
    [pred] = task.predict(RedFinder(), [image], task.build_transforms(params)[1], CPU)
    assert pred["labels"] == [0] and np.abs(np.array(pred["boxes"]) - [box]).max() < 1.0
    x = export.preprocess([image], s, "letterbox")
    assert x.shape == (1, 3, s, s)
    with torch.no_grad():
        out = task.outputs_to_numpy(DetectionsGraph(RedFinder())(torch.from_numpy(x)))
    [got] = task.exported_predictions(out, [(h, w)], s, "letterbox")
    assert np.abs(np.array(got["boxes"]) - [box]).max() < 1.0
    # stretched, the same photo's box also comes back (a stretch-trained model)
    [flat] = task.predict(RedFinder(), [image], task.build_transforms(detect_params("stretch", size=s))[1], CPU)
    assert np.abs(np.array(flat["boxes"]) - [box]).max() < max(h, w) / s


def test_fit_keeps_each_photos_shape_and_pads_a_batch_to_its_largest_only():
    """resize: fit (detect): longest side to S, no padding per image; a batch of photos of
    different shapes is padded at the bottom and right to its largest height and width, so the
    frames have no offset, and a batch of landscape photos is not a square."""
    from visionflow.training.augment import batch_chw

    tf = build_eval_transform(256, normalize=False, resize="fit")
    assert [type(t).__name__ for t in tf.transforms] == ["LongestMaxSize", "Normalize"]
    wide, tall = input_frame(tf, 1080, 1920), input_frame(tf, 1280, 480)
    assert (wide.rows, wide.cols, wide.top, wide.left) == (144, 256, 0, 0)
    assert (tall.rows, tall.cols, tall.top, tall.left) == (256, 96, 0, 0)
    images = [tf(image=np.full((h, w, 3), 200, np.uint8))["image"] for h, w in ((1080, 1920), (1280, 480))]
    assert [im.shape for im in images] == [(144, 256, 3), (256, 96, 3)]
    batch = batch_chw(images)
    assert batch.shape == (2, 3, 256, 256)
    assert (batch[0, :, :144] > 0.7).all() and (batch[0, :, 144:] == 0).all()
    assert (batch[1, :, :, :96] > 0.7).all() and (batch[1, :, :, 96:] == 0).all()
    assert batch_chw([images[0], images[0][:100]]).shape == (2, 3, 144, 256)  # landscape only: 144 rows
    assert export.preprocess([np.zeros((1080, 1920, 3), np.uint8)] * 2, 256, "fit").shape == (2, 3, 144, 256)


def test_the_loader_pads_mixed_sizes_like_prediction_and_pads_the_masks_too():
    from visionflow.training.loader import chw_tensor, stack

    rng = np.random.default_rng(5)
    hwc = [rng.integers(1, 255, (h, w, 3), dtype=np.uint8) for h, w in ((30, 64), (64, 20))]
    for tensors in ([chw_tensor(a) for a in hwc],  # uint8 views, channels-last (CUDA's batches)
                    [torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))) for a in hwc]):
        batch = stack(tensors, pad=True)
        assert batch.shape == (2, 3, 64, 64)
        from visionflow.training.augment import batch_chw
        np.testing.assert_array_equal(batch.numpy(), batch_chw(hwc))
    with pytest.raises(RuntimeError):  # without pad=True (classify, segment) sizes must agree
        stack([torch.zeros(3, 4, 4), torch.zeros(3, 5, 4)])
    targets = [{"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.int64),
                "masks": torch.ones(1, h, w, dtype=torch.uint8)} for h, w in ((30, 64), (64, 20))]
    x, ys = DetectTask().collate([(torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))), t)
                                  for a, t in zip(hwc, targets)])
    assert x.shape == (2, 3, 64, 64) and [y["masks"].shape for y in ys] == [(1, 64, 64)] * 2
    assert int(ys[0]["masks"].sum()) == 30 * 64 and int(ys[1]["masks"].sum()) == 64 * 20


@pytest.mark.parametrize("arch", ["fasterrcnn", "maskrcnn"])
def test_a_detector_trains_validates_predicts_and_exports_on_mixed_size_batches(tmp_path, arch):
    """A real detector with resize: fit: a training step and validation on a batch of a landscape
    and a portrait image (each unpadded but for the batch), predict mapping boxes (and masks)
    back to each image, and the TorchScript export (the gate's parity path) giving the same."""
    s, task = 64, DetectTask()
    params = detect_params("fit", size=s, score_threshold=0.0)
    params = params.model_copy(update={"model": params.model.model_copy(update={"arch": arch})})
    model = task.build_model(params, num_classes=2, pretrained=False)
    train_tf, eval_tf = task.build_transforms(params)
    rng = np.random.default_rng(6)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((90, 160), (160, 60))]
    items = []
    for image, box in zip(images, ([20.0, 10.0, 90.0, 60.0], [5.0, 30.0, 50.0, 120.0])):
        mask = np.zeros(image.shape[:2], np.uint8)
        x1, y1, x2, y2 = (int(v) for v in box)
        mask[y1:y2, x1:x2] = 1
        out = train_tf(image=image, bboxes=np.array([box], np.float32), labels=[1], instance_ids=[0], masks=[mask])
        target = {"boxes": torch.tensor(np.asarray(out["bboxes"], np.float32)), "labels": torch.tensor([1]),
                  "masks": torch.from_numpy(np.stack(out["masks"]))}
        items.append((torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))), target))
    x, targets = task.collate(items)
    assert x.shape == (2, 3, s, s) and tuple(items[0][0].shape[1:]) == (36, 64)
    model.train()
    losses = task.loss(model, x, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    metrics = task.val_metrics(model, [(x, targets)], CPU)
    assert {"val_map", "val_map50"} <= set(metrics)

    preds = task.predict(model.eval(), images, eval_tf, CPU)
    assert all(len(p["boxes"]) for p in preds)
    for image, pred in zip(images, preds):  # in each image's own pixels
        h, w = image.shape[:2]
        b = np.array(pred["boxes"])
        assert (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all()
        if arch == "maskrcnn":
            assert len(pred["masks"]) == len(pred["boxes"])

    model_dir = write_model_dir(tmp_path / "fit", "detect", params, drop_resize=False)
    torch.save(model.state_dict(), model_dir / MODEL_FILE)
    info = export.export_model(model_dir, "torchscript", tmp_path / "fit.pt")
    assert info["input"]["shape"] == ["batch", 3, "height", "width"] and info["input"]["resize_mode"] == "fit"
    predictor = load_predictor(model_dir)
    exported = export.load_exported(info["path"], "detect")
    # prediction batches a landscape and a portrait image apart (one orientation per batch); the
    # exported file is fed the same batches, as the promotion gate's parity check feeds it
    assert predictor.batches(images, 2) == [[0], [1]]
    got = [p for im in images for p in task.exported_predictions(exported(export.preprocess([im], s, "fit")),
                                                                  [im.shape[:2]], s, "fit")]
    for ref, out in zip(predictor.predict(images, batch_size=2), got):
        assert len(ref["boxes"]) == len(out["boxes"]) > 0
        assert np.abs(np.array(ref["boxes"]) - np.array(out["boxes"])).max() < 1e-3
        assert np.abs(np.array(ref["scores"]) - np.array(out["scores"])).max() < 1e-4


def test_fit_is_for_detect_only():
    from visionflow.core.config import Params

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["detect"]["train"]["resize"] = "fit"
    assert Params.model_validate(raw).detect.train.resize == "fit"
    for task in ("segment", "classify"):
        bad = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
        bad[task]["train"]["resize"] = "fit"
        with pytest.raises(Exception, match=f"{task}.train.resize: fit .* is for detect only"):
            Params.model_validate(bad)
    raw["detect"]["train"]["model"].update(arch="ssdlite320_mobilenet_v3_large", backbone=None)
    with pytest.raises(Exception, match="fit gains nothing with ssdlite320_mobilenet_v3_large"):
        Params.model_validate(raw)


class RedFinder(nn.Module):
    """A torchvision-style detector (list of (3, S, S) images in [0, 1] -> list of dicts, labels
    1..K): the bounding box of the red pixels, label 1, score 0.9."""

    def forward(self, images):
        out = []
        for im in images:
            ys, xs = torch.nonzero((im[0] > 0.6) & (im[1] < 0.4), as_tuple=True)
            boxes = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
            out.append({"boxes": boxes, "labels": torch.tensor([1]), "scores": torch.tensor([0.9])})
        return out


def test_a_real_detectors_boxes_are_its_raw_outputs_mapped_to_each_inputs_pixels():
    """A Faster R-CNN (random weights, every detection kept): predict's boxes are the model's own
    S x S boxes with the padding taken off and scaled by size / fitted size, derived here by hand."""
    s, task = 64, DetectTask()
    params = detect_params(size=s, score_threshold=0.0)
    model = task.build_model(params, num_classes=2, pretrained=False).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((108, 192), (128, 48))]
    transform = task.build_transforms(params)[1]
    preds = task.predict(model, images, transform, CPU)
    for image, pred in zip(images, preds):
        h, w = image.shape[:2]
        scale = s / max(h, w)
        rows, cols = round(h * scale), round(w * scale)
        top, left = (s - rows) // 2, (s - cols) // 2
        x = torch.from_numpy(transform(image=image, bboxes=np.zeros((0, 4)), labels=[], instance_ids=[])["image"]
                             .transpose(2, 0, 1))
        with torch.no_grad():
            raw = model([x])[0]
        keep = raw["labels"] > 0
        order = torch.argsort(raw["scores"][keep], descending=True)
        b = raw["boxes"][keep][order].double().numpy()
        expected = np.stack([(b[:, 0] - left) * w / cols, (b[:, 1] - top) * h / rows,
                             (b[:, 2] - left) * w / cols, (b[:, 3] - top) * h / rows], 1)
        expected[:, 0::2], expected[:, 1::2] = expected[:, 0::2].clip(0, w), expected[:, 1::2].clip(0, h)
        assert len(pred["boxes"]) > 0
        assert np.abs(np.array(pred["boxes"]) - expected).max() < 1e-3
        assert max(bb[2] for bb in pred["boxes"]) > s or max(bb[3] for bb in pred["boxes"]) > s  # photo pixels


def test_stretch_detection_maps_back_as_before():
    s, task = 64, DetectTask()
    params = detect_params("stretch", size=s, score_threshold=0.0)
    assert type(task.build_transforms(params)[1].transforms[0]) is A.Resize
    model = task.build_model(params, num_classes=2, pretrained=False).eval()
    image = np.random.default_rng(1).integers(0, 255, (40, 90, 3), dtype=np.uint8)
    transform = task.build_transforms(params)[1]
    [pred] = task.predict(model, [image], transform, CPU)
    x = torch.from_numpy(transform(image=image, bboxes=np.zeros((0, 4)), labels=[], instance_ids=[])["image"]
                         .transpose(2, 0, 1))
    with torch.no_grad():
        raw = model([x])[0]
    keep = raw["labels"] > 0
    b = raw["boxes"][keep][torch.argsort(raw["scores"][keep], descending=True)]
    expected = (b * torch.tensor([90 / s, 40 / s, 90 / s, 40 / s])).numpy()  # the old per-axis scaling
    expected[:, 0::2], expected[:, 1::2] = expected[:, 0::2].clip(0, 90), expected[:, 1::2].clip(0, 40)
    assert np.abs(np.array(pred["boxes"]) - expected).max() < 1e-3


# --- segmentation: the padding is ignored, masks come back at each input's size -------------

def seg_sample(tmp_path, name, h, w, box) -> Sample:
    image = photo(h, w, box)
    Image.fromarray(image).save(tmp_path / name)
    pixels = np.zeros((h, w), bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    pixels[y1:y2, x1:x2] = True
    inst = Instance(bbox=[float(x1), float(y1), float(x2), float(y2)], category_id=0, rle=encode_rle(pixels))
    return Sample(id=name, root=str(tmp_path), path=name, width=w, height=h, sha256="0" * 64, instances=[inst])


def test_letterbox_padding_is_ignore_in_the_training_and_validation_targets(tmp_path):
    assert IGNORE == IGNORE_INDEX
    task = SegmentTask()
    s = seg_sample(tmp_path, "wide.png", 48, 128, [8, 8, 40, 40])
    train_tf, eval_tf = task.build_transforms(segment_params())
    for tf in (train_tf, eval_tf):
        x, y = task.build_dataset([s], tf, tmp_path)[0]
        assert x.shape == (3, 64, 64) and y.shape == (64, 64)
        frame = input_frame(tf, 48, 128)
        assert (frame.top, frame.rows, frame.left, frame.cols) == (20, 24, 0, 64)
        assert (y[:20] == IGNORE_INDEX).all() and (y[44:] == IGNORE_INDEX).all()
        content = y[20:44]
        assert (content != IGNORE_INDEX).all() and set(content.unique().tolist()) == {0, 1}
        assert int((content == 1).sum()) == 16 * 16  # the 32 x 32 box at half the size
    prefix, _ = split_transform(train_tf)  # the loader's cached prefix takes the padding too
    assert [type(t).__name__ for t in prefix.transforms] == ["LongestMaxSize", "PadIfNeeded"]
    # stretch: no padding, no ignore
    _, y = task.build_dataset([s], task.build_transforms(segment_params("stretch"))[0], tmp_path)[0]
    assert (y != IGNORE_INDEX).all()


class ColourOracle(nn.Module):
    """Normalised images -> one-hot logits: red class 1, black (the letterbox padding) class 2,
    anything else background; the padding is thus always predicted wrong."""

    def forward(self, x):
        ids = torch.zeros_like(x[:, 0], dtype=torch.long)
        ids[x[:, 0] - x[:, 1] > 1.0] = 1
        ids[(x < -1.5).all(1)] = 2
        return F.one_hot(ids, 3).permute(0, 3, 1, 2).float() * 20.0


def test_padding_counts_for_neither_the_loss_nor_the_validation_metrics(tmp_path):
    task = SegmentTask()
    # halved exactly (edges on even pixels): image and mask agree pixel for pixel in the content
    samples = [seg_sample(tmp_path, "wide.png", 32, 128, [8, 4, 40, 28]),
               seg_sample(tmp_path, "tall.png", 128, 32, [4, 16, 28, 64])]
    train_tf, eval_tf = task.build_transforms(segment_params())
    images, targets = task.collate([task.build_dataset(samples, train_tf, tmp_path)[i] for i in range(2)])
    assert int((targets == IGNORE_INDEX).sum()) == 64 * 48 * 2  # 16 x 64 and 64 x 16 of content
    assert float(task.loss(ColourOracle(), images, targets)["cross_entropy"]) < 1e-6
    loader = [task.collate([task.build_dataset(samples, eval_tf, tmp_path)[i] for i in range(2)])]
    m = task.val_metrics(ColourOracle(), loader, CPU)
    assert m["val_miou"] == 1.0 and m["val_pixel_accuracy"] == 1.0 and m["val_loss"] < 1e-6


@pytest.mark.parametrize("h, w, s", PHOTOS)
def test_predicted_masks_are_each_photos_own_pixels_through_predict_and_export(tmp_path, h, w, s):
    box = photo_box(h, w, s)
    sample = seg_sample(tmp_path, "p.png", h, w, box)
    image = np.asarray(Image.open(sample.image_path()))
    truth = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    truth[y1:y2, x1:x2] = 1
    task, params = SegmentTask(), segment_params(size=s)
    [pred] = task.predict(ColourOracle(), [image], task.build_transforms(params)[1], CPU)
    assert pred["mask"].shape == (h, w)
    same_as_truth(pred["mask"], truth, box)  # no padding class, nothing shifted or scaled
    metric = task.test_metric([Category(0, "red")])
    metric.process([sample], [pred])
    assert metric.compute().value > 0.999
    graph = LogitsMaskGraph(ColourOracle(), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        out = task.outputs_to_numpy(graph(torch.from_numpy(export.preprocess([image], s, "letterbox"))))
    [got] = task.exported_predictions(out, [(h, w)], s, "letterbox")
    same_as_truth(got["mask"], truth, box)


def same_as_truth(mask: np.ndarray, truth: np.ndarray, box) -> None:
    """Equal but for ties of the bilinear upsampling on the box's outline (argmax picks background)."""
    assert set(np.unique(mask).tolist()) <= {0, 1}
    ys, xs = np.nonzero(mask != truth)
    on_edge = np.minimum(np.minimum(np.abs(xs - box[0]), np.abs(xs + 1 - box[2])),
                         np.minimum(np.abs(ys - box[1]), np.abs(ys + 1 - box[3]))) <= 1
    assert on_edge.all() and len(xs) <= 0.001 * truth.sum()
    ys, xs = np.nonzero(mask)
    assert np.abs(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) - box).max() <= 1


def test_a_real_segmenter_predicts_each_inputs_size_batched_or_not(tmp_path):
    task, params = SegmentTask(), segment_params()
    model = task.build_model(params, 2, pretrained=False).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((27, 48), (80, 30), (64, 64))]
    transform = task.build_transforms(params)[1]
    together = task.predict(model, images, transform, CPU)
    for image, pred in zip(images, together):
        assert pred["mask"].shape == image.shape[:2] and pred["mask"].dtype == np.uint8
        np.testing.assert_array_equal(task.predict(model, [image], transform, CPU)[0]["mask"], pred["mask"])


def test_stretch_segmentation_upsamples_the_whole_input_as_before():
    task, params = SegmentTask(), segment_params("stretch")
    model = task.build_model(params, 2, pretrained=False).eval()
    image = np.random.default_rng(2).integers(0, 255, (40, 70, 3), dtype=np.uint8)
    transform = task.build_transforms(params)[1]
    assert [type(t) for t in transform.transforms[:1]] == [A.Resize]
    [pred] = task.predict(model, [image], transform, CPU)
    with torch.no_grad():
        logits = model(torch.from_numpy(transform(image=image)["image"].transpose(2, 0, 1))[None])
    expected = F.interpolate(logits, size=(40, 70), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    np.testing.assert_array_equal(pred["mask"], expected)


# --- params, model folders trained before the field, the export sidecar ---------------------

def test_letterbox_is_the_default_and_params_yaml_says_it_for_detect_and_segment():
    from pathlib import Path

    assert TrainParams().resize == "letterbox"
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert raw["detect"]["train"]["resize"] == raw["segment"]["train"]["resize"] == "letterbox"
    with pytest.raises(Exception, match="resize"):
        TrainParams(resize="squash")


def write_model_dir(root, task_name: str, params: TrainParams, drop_resize: bool):
    # drop_resize: meta.json as visionflow wrote it before train.resize existed
    return write_model_folder(root, task_name, params, drop=("resize",) if drop_resize else ())


@pytest.mark.parametrize("task_name", ["detect", "segment"])
def test_a_model_folder_without_resize_predicts_stretched_as_it_was_trained(tmp_path, task_name):
    params = (detect_params if task_name == "detect" else segment_params)("letterbox")
    legacy = load_predictor(write_model_dir(tmp_path / "old", task_name, params, drop_resize=True))
    new = load_predictor(write_model_dir(tmp_path / "new", task_name, params, drop_resize=False))
    assert type(legacy.transform.transforms[0]) is A.Resize
    assert type(new.transform.transforms[0]) is A.LongestMaxSize
    assert legacy.task.input_resize(legacy.meta) == "stretch" and new.task.input_resize(new.meta) == "letterbox"
    (pred,) = new.predict([np.zeros((30, 70, 3), np.uint8)])
    if task_name == "segment":
        assert pred["mask"].shape == (30, 70)


def test_classification_always_stretches():
    meta = {"params": {"resize": "letterbox"}}
    assert get_task("classify").input_resize(meta) == "stretch"
    assert get_task("multilabel").input_resize(meta) == "stretch"
    assert get_task("detect").input_resize({"params": {}}) == "stretch"  # a legacy meta.json
    tf = get_task("classify").build_transforms(TrainParams(resize="letterbox"))[1]
    assert type(tf.transforms[0]) is A.Resize


def test_preprocess_is_the_eval_transforms_geometry():
    image = np.random.default_rng(3).integers(0, 255, (45, 100, 3), dtype=np.uint8)
    x = export.preprocess([image], 64, "letterbox")[0].transpose(1, 2, 0)
    expected = A.Compose(resize_steps(64, "letterbox"))(image=image)["image"]
    np.testing.assert_array_equal(x, expected.astype(np.float32))
    eval_x = build_eval_transform(64, normalize=False, resize="letterbox")(image=image)["image"]
    np.testing.assert_allclose(x / 255.0, eval_x, atol=1e-6)


def test_init_writes_letterbox_for_detect_and_segment_even_from_an_older_template(tmp_path):
    from visionflow.formats.detect import Detected
    from visionflow.project import _rewrite

    template = {"detect": {"train": {"image_size": 96}}, "segment": {"train": {"resize": "stretch"}},
                "classify": {"train": {"image_size": 96}}}
    found = Detected("coco", tmp_path / "images", tmp_path / "a.json", "test")
    raw = _rewrite(template, found, "mine", tmp_path, {"detect": "", "segment": "", "classify": ""}, False)
    assert raw["detect"]["train"]["resize"] == "letterbox"
    assert raw["segment"]["train"]["resize"] == "stretch"  # the user's choice is kept
    assert "resize" not in raw["classify"]["train"]


def test_a_letterboxed_segmenters_onnx_export_predicts_what_pytorch_predicts(tmp_path):
    """The export path the promotion gate checks and predict/serve run (onnxruntime): letterboxed
    input, masks back at each photo's size, equal to the model folder's own predictions."""
    from visionflow.deploy.runtime import OnnxPredictor

    model_dir = write_model_dir(tmp_path / "segment", "segment", segment_params(), drop_resize=False)
    info = export.export_model(model_dir, "onnx", tmp_path / "segment.onnx")
    assert info["input"]["resize_mode"] == "letterbox" and info["input"]["resize"].startswith("letterbox")
    torch_side = load_predictor(model_dir)
    onnx_side = OnnxPredictor(tmp_path / "segment.onnx", torch_side.meta)
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((54, 96), (120, 45))]
    for ref, got, image in zip(torch_side.predict(images), onnx_side.predict(images), images):
        assert got["mask"].shape == image.shape[:2]
        assert (ref["mask"] == got["mask"]).mean() > 0.999  # float differences may flip a tie
