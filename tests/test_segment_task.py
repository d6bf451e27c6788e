"""Semantic segmentation task: targets, augmentation alignment, every architecture, weights,
prediction at the original size and the metrics, on a few 64 px images made in tmp_path."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from visionflow.core.config import ARCHS, AugmentParams, ModelParams, TrainParams
from visionflow.core.errors import DataError, UserError
from visionflow.manifest.masks import encode_rle, semantic_mask
from visionflow.manifest import Instance, Sample
from visionflow.models.classifiers import torch_cache_dir
from visionflow.models.segmenters import build_segmenter
from visionflow.tasks import get_task
from visionflow.deploy.predictor import META_FILE, MODEL_FILE, load_predictor
from visionflow.tasks.segment import SegmentTask, soft_dice_loss

K = 3  # categories; models predict K + 1 channels
LOGGER = "visionflow.models.segmenters"


pytestmark = pytest.mark.usefixtures("one_thread_seeded")


def box(x1, y1, x2, y2, h=64, w=64) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def rle_instance(pixels: np.ndarray, cat: int, crowd: bool = False) -> Instance:
    ys, xs = np.nonzero(pixels)
    return Instance(bbox=[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                    category_id=cat, rle=encode_rle(pixels), iscrowd=crowd)


def make_sample(tmp_path, name: str, image: np.ndarray, instances=(), ignore=None) -> Sample:
    Image.fromarray(image).save(tmp_path / name)
    attributes = {} if ignore is None else {"ignore_rle": encode_rle(ignore)}
    return Sample(id=name, root=str(tmp_path), path=name, width=image.shape[1], height=image.shape[0],
                  sha256="0" * 64, instances=list(instances), attributes=attributes)


def shapes_samples(tmp_path, n: int = 4) -> list[Sample]:
    """n 64 px images, each with two coloured rectangles of different classes."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        a, b = box(4 + i, 6, 30 + i, 40), box(30, 20 + i, 60, 58)
        image[a], image[b] = (220, 40, 40), (40, 220, 40)
        out.append(make_sample(tmp_path, f"s{i}.png", image, [rle_instance(a, i % K), rle_instance(b, (i + 1) % K)]))
    return out


def train_params(arch="unet", image_size=64, augment=None, **model) -> TrainParams:
    return TrainParams(model=ModelParams(arch=arch, **model), image_size=image_size, batch_size=2,
                       augment=augment or AugmentParams(preset="none"))


# --- targets ---------------------------------------------------------------------------------

def test_target_paints_in_manifest_order_crowd_as_class_ignore_last(tmp_path):
    a, b, crowd, ignore = box(2, 2, 20, 20), box(10, 10, 30, 30), box(40, 40, 60, 60), box(15, 0, 18, 64)
    s = make_sample(tmp_path, "t.png", np.zeros((64, 64, 3), np.uint8),
                    [rle_instance(a, 0), rle_instance(b, 2), rle_instance(crowd, 1, crowd=True),
                     Instance(bbox=[0, 50, 10, 60], category_id=1)],  # box only: not painted
                    ignore=ignore)
    expected = np.zeros((64, 64), np.uint8)
    expected[a], expected[b], expected[crowd] = 1, 3, 2  # b (later) on top of a
    expected[ignore] = 255
    mask = semantic_mask(s)
    assert mask.dtype == np.uint8 and mask.shape == (64, 64)
    np.testing.assert_array_equal(mask, expected)


def test_target_of_an_unlabelled_image_is_background_and_bad_ids_are_refused(tmp_path):
    s = make_sample(tmp_path, "e.png", np.zeros((20, 30, 3), np.uint8))
    np.testing.assert_array_equal(semantic_mask(s), np.zeros((20, 30), np.uint8))
    s.instances = [rle_instance(box(0, 0, 5, 5, 20, 30), 254)]
    with pytest.raises(ValueError, match="254"):
        semantic_mask(s)


def test_mask_moves_with_the_image_through_flip_and_affine(tmp_path):
    image = np.zeros((64, 64, 3), np.uint8)
    square = box(8, 12, 30, 28)  # off-centre, so a flip or a rotation moves it
    image[square] = (255, 0, 0)
    s = make_sample(tmp_path, "sq.png", image, [rle_instance(square, 0)])
    augment = AugmentParams(transforms=[
        {"name": "HorizontalFlip", "p": 1.0},
        {"name": "Affine", "rotate": (25, 25), "translate_percent": (0.1, 0.1), "scale": (1.1, 1.1), "p": 1.0}])
    task = SegmentTask()
    train_tf, _ = task.build_transforms(train_params(augment=augment))
    x, y = task.build_dataset([s], train_tf, tmp_path)[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (64, 64) and y.dtype == torch.uint8  # int64 where the loss runs
    red = (x[0] * 0.229 + 0.485) > 0.5  # undo ImageNet normalisation of the red channel
    moved = y == 1
    iou = float((red & moved).sum() / (red | moved).sum())
    assert iou > 0.9, iou  # only boundary pixels differ (bilinear image vs nearest mask)
    assert float((moved & torch.from_numpy(square)).sum() / moved.sum()) < 0.5  # it did move
    assert set(y.unique().tolist()) <= {0, 1}


def test_image_size_disagreeing_with_the_manifest_is_a_data_error(tmp_path):
    s = make_sample(tmp_path, "m.png", np.zeros((64, 64, 3), np.uint8))
    s.width = 60
    task = SegmentTask()
    with pytest.raises(DataError, match="m.png.*64x64.*60x64"):
        task.build_dataset([s], task.build_transforms(train_params())[1], tmp_path)[0]


# --- models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS["segment"])
def test_every_arch_trains_a_step_and_predicts_at_the_original_size(tmp_path, arch):
    task = SegmentTask()
    params = train_params(arch, **({"width": 0.25} if arch == "unet" else {}))
    model = task.build_model(params, K, pretrained=False)
    train_tf, eval_tf = task.build_transforms(params)
    images, targets = task.collate([task.build_dataset(shapes_samples(tmp_path, 2), train_tf, tmp_path)[i]
                                    for i in range(2)])
    assert images.shape == (2, 3, 64, 64) and targets.shape == (2, 64, 64) and targets.dtype == torch.uint8
    model.train()
    losses = task.loss(model, images, targets)
    assert set(losses) == {"cross_entropy"} and torch.isfinite(losses["cross_entropy"])
    losses["cross_entropy"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    assert model(images).shape == (2, K + 1, 64, 64)
    odd = np.zeros((53, 77, 3), np.uint8)
    (pred,) = task.predict(model, [odd], eval_tf, torch.device("cpu"))
    assert pred["mask"].shape == (53, 77) and pred["mask"].dtype == np.uint8 and pred["mask"].max() <= K


def test_predict_batched_equals_one_by_one_at_each_original_size(tmp_path):
    task = SegmentTask()
    params = train_params(width=0.25)
    model = task.build_model(params, K, pretrained=False).eval()
    with torch.no_grad():  # random init predicts its head's largest bias everywhere: let features decide
        model.head.bias.zero_()
    eval_tf = task.build_transforms(params)[1]
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((53, 77), (64, 64), (90, 31))]
    batched = task.predict(model, images, eval_tf, torch.device("cpu"))
    single = [task.predict(model, [im], eval_tf, torch.device("cpu"))[0] for im in images]
    for im, a, b in zip(images, batched, single):
        assert a["mask"].shape == im.shape[:2]
        # Batched convolutions may round differently; an argmax tie may flip, nothing more.
        assert (a["mask"] == b["mask"]).mean() > 0.999
    assert len(np.unique(np.concatenate([p["mask"].ravel() for p in batched]))) > 1  # not a constant answer


@pytest.mark.parametrize("backbone", [None, "mobilenet_v2"])
def test_unet_shapes_for_sizes_and_widths(backbone):
    for width in (0.25, 0.5, 1.0):
        model = build_segmenter(ModelParams(arch="unet", backbone=backbone, width=width), K, pretrained=False).eval()
        for h, w in ((32, 32), (64, 96), (77, 53)):  # 77 x 53: zero-padded to 96 x 64 inside
            with torch.no_grad():
                out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, K + 1, h, w) and out.dtype == torch.float32
        if backbone is None:
            break  # the conv encoder's widths are covered above; one pass of each is enough
    base = build_segmenter(ModelParams(arch="unet", width=1.0), K, pretrained=False)
    small = build_segmenter(ModelParams(arch="unet", width=0.25), K, pretrained=False)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in base.parameters()) / 8


def test_unet_pads_odd_sizes_instead_of_failing():
    model = build_segmenter(ModelParams(arch="unet", width=0.25), K, pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        padded_inside = model(x[:, :, :50, :40])
        padded_outside = model(F.pad(x[:, :, :50, :40], [0, 24, 0, 14]))[:, :, :50, :40]
    torch.testing.assert_close(padded_inside, padded_outside)


# --- weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["unet", "lraspp_mobilenet_v3_large"])
def test_weights_file_round_trip_gives_identical_outputs(tmp_path, caplog, arch):
    first = build_segmenter(ModelParams(arch=arch), K, pretrained=False).eval()
    path = tmp_path / "trained.pt"
    torch.save(first.state_dict(), path)
    caplog.set_level(logging.INFO, logger=LOGGER)
    second = build_segmenter(ModelParams(arch=arch, weights=str(path)), K, pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
    assert any(str(path) in r.getMessage() for r in caplog.records)
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    build_segmenter(ModelParams(arch=arch, weights=str(path)), K, pretrained=False)
    assert [(r.levelno, "architecture only" in r.getMessage()) for r in caplog.records] == [(logging.DEBUG, True)]


def test_trainable_backbone_layers_apply_only_with_loaded_weights(tmp_path):
    path = tmp_path / "unet.pt"
    torch.save(build_segmenter(ModelParams(arch="unet", width=0.25), K, pretrained=False).state_dict(), path)
    params = ModelParams(arch="unet", width=0.25, weights=str(path), trainable_backbone_layers=1)
    model = build_segmenter(params, K)
    frozen = [not any(p.requires_grad for p in m.parameters()) for m in (model.stem, *model.encoder)]
    assert frozen == [True, True, True, True, True, False]  # stem + 4 of 5 stages; the last trains
    assert all(p.requires_grad for p in [*model.decoder.parameters(), *model.head.parameters()])
    scratch = build_segmenter(params.model_copy(update={"weights": None}), K)
    assert all(p.requires_grad for p in scratch.parameters())  # nothing pretrained to keep


def test_torchvision_weights_with_another_class_count_replace_the_last_conv(tmp_path):
    import torchvision

    theirs = torchvision.models.get_model("deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None,
                                          num_classes=21, aux_loss=True)
    path = tmp_path / "voc.pth"
    torch.save(theirs.state_dict(), path)  # torchvision's keys, 21 classes, an aux head
    ours = build_segmenter(ModelParams(arch="deeplabv3_mobilenet_v3_large", weights=str(path)), K)
    mine = ours.state_dict()
    assert mine["net.classifier.4.weight"].shape[0] == K + 1
    assert not any("aux" in k for k in mine)
    for k, v in theirs.state_dict().items():
        if not k.startswith(("aux_classifier.", "classifier.4.")):
            assert torch.equal(mine["net." + k], v), k


def test_weights_that_do_not_fit_are_a_user_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_segmenter(ModelParams(arch="unet", width=0.25), K, pretrained=False).state_dict(), path)
    with pytest.raises(UserError, match="other.pt does not fit"):
        build_segmenter(ModelParams(arch="unet", width=0.5, weights=str(path)), K)
    with pytest.raises(UserError, match="unet has no torchvision weights"):
        build_segmenter(ModelParams(arch="unet", weights="COCO_V1"), K)
    with pytest.raises(UserError, match="backbone"):
        build_segmenter(ModelParams(arch="fcn_resnet50", backbone="mobilenet_v2"), K)


@pytest.mark.parametrize("arch, backbone", [("unet", "mobilenet_v2"), ("deeplabv3_mobilenet_v3_large", None)])
def test_backbone_weights_missing_from_the_cache_never_download(tmp_path, monkeypatch, arch, backbone):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    params = ModelParams(arch=arch, backbone=backbone, backbone_weights="IMAGENET1K_V1")
    with pytest.raises(UserError, match="backbone_weights.*never downloads"):
        build_segmenter(params, K)
    build_segmenter(params, K, pretrained=False)  # rebuilding a trained model needs no cache


def test_backbone_weights_from_the_cache_load_and_freeze_early_stages(tmp_path, monkeypatch, caplog):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    imagenet = torchvision.models.mobilenet_v2(weights=None).state_dict()  # stands in for the real file
    cached = torch_cache_dir() / "mobilenet_v2-b0353104.pth"
    cached.parent.mkdir(parents=True)
    torch.save(imagenet, cached)
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = build_segmenter(ModelParams(arch="unet", backbone="mobilenet_v2", backbone_weights="IMAGENET1K_V1",
                                        trainable_backbone_layers=2), K)
    assert any(str(cached) in r.getMessage() for r in caplog.records)
    state = model.state_dict()
    assert torch.equal(state["encoder.0.0.0.weight"], imagenet["features.0.0.weight"])  # stem conv
    assert torch.equal(state["encoder.4.4.0.weight"], imagenet["features.18.0.weight"])  # last 1x1 conv
    trainable = [any(p.requires_grad for p in stage.parameters()) for stage in model.encoder]
    assert trainable == [False, False, False, True, True]
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_backbone_weights_file_loads_into_a_torchvision_segmenter(tmp_path, caplog):
    import torchvision

    imagenet = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    path = tmp_path / "mnv3.pth"
    torch.save(imagenet, path)
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = build_segmenter(ModelParams(arch="lraspp_mobilenet_v3_large", backbone_weights=str(path),
                                        trainable_backbone_layers=0), K)
    assert any(f"mobilenet_v3_large backbone weights from file {path}" in r.getMessage() for r in caplog.records)
    backbone = model.net.backbone.state_dict()
    for k, v in imagenet.items():
        if k.startswith("features."):
            assert torch.equal(backbone[k.removeprefix("features.")], v), k
    assert not any(p.requires_grad for p in model.net.backbone.parameters())
    assert all(p.requires_grad for p in model.net.classifier.parameters())


# --- loss and metrics ----------------------------------------------------------------------------

class OneHotOracle(nn.Module):
    """Returns one-hot logits of the class id stored in image channel 0 (ignore -> class K)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0].long().clamp(max=K)
        return F.one_hot(ids, K + 1).permute(0, 3, 1, 2).float() * 20.0  # (B, K + 1, H, W)


def oracle_batches():
    targets = torch.zeros(2, 16, 16, dtype=torch.int64)
    targets[0, 2:8, 2:8], targets[1, 5:15, 0:4], targets[1, 0:3, :] = 1, 3, 255
    images = targets[:, None].float().repeat(1, 3, 1, 1)
    return [(images, targets)]


def test_val_metrics_of_a_perfect_model_and_of_a_background_only_model():
    task = SegmentTask()
    m = task.val_metrics(OneHotOracle(), oracle_batches(), torch.device("cpu"))
    assert set(m) == {"val_loss", "val_miou", "val_pixel_accuracy"}
    assert m["val_miou"] == 1.0 and m["val_pixel_accuracy"] == 1.0 and m["val_loss"] < 1e-6  # 255 ignored

    class Background(nn.Module):
        def forward(self, x):
            return F.one_hot(torch.zeros_like(x[:, 0]).long(), K + 1).permute(0, 3, 1, 2).float()

    m = task.val_metrics(Background(), oracle_batches(), torch.device("cpu"))
    valid = 2 * 256 - 48
    background = valid - 36 - 40
    assert m["val_pixel_accuracy"] == pytest.approx(background / valid)
    assert m["val_miou"] == pytest.approx(background / valid / 3)  # classes 0, 1, 3 present; 1 and 3 score 0


def test_loss_ignores_the_ignore_region():
    task, model = SegmentTask(), OneHotOracle()
    images, targets = oracle_batches()[0]
    assert float(task.loss(model, images, targets)["cross_entropy"]) < 1e-6
    all_ignored = torch.full_like(targets, 255)
    loss = task.loss(model, images, all_ignored)["cross_entropy"]
    assert torch.isfinite(loss) and float(loss) == 0.0


def test_soft_dice_by_hand_ignore_region_and_absent_classes():
    # 2 x 2 pixels, 3 classes; targets 0, 1 / 1, ignored. Softmax probabilities per pixel:
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    logits = probs.log().T.reshape(1, 3, 2, 2).clone().requires_grad_(True)
    targets = torch.tensor([[[0, 1], [1, 255]]])
    # class 0: (2 * 0.1 + 1) / (1.0 + 1 + 1); class 1: (2 * 0.9 + 1) / (1.7 + 2 + 1);
    # class 2 is in no target: left out of the mean (else it would score 1 / (0.3 + 1)).
    expected = 1 - (1.2 / 3.0 + 2.8 / 4.7) / 2
    loss = soft_dice_loss(logits, targets)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert torch.all(logits.grad[0, :, 1, 1] == 0) and logits.grad.abs().sum() > 0  # ignored pixel: no gradient
    moved = logits.detach().clone()
    moved[0, :, 1, 1] = torch.tensor([5.0, -3.0, 0.0])  # whatever is predicted there does not count
    assert float(soft_dice_loss(moved, targets)) == pytest.approx(expected, abs=1e-6)


def test_dice_weight_adds_a_dice_term_and_zero_is_plain_cross_entropy():
    images, targets = oracle_batches()[0]
    model = OneHotOracle()
    assert float(soft_dice_loss(model(images), targets)) < 1e-6  # perfect prediction
    everything_ignored = torch.full_like(targets, 255)
    zero = soft_dice_loss(model(images).requires_grad_(True), everything_ignored)
    assert zero.item() == 0.0 and zero.requires_grad
    assert set(SegmentTask().loss(model, images, targets)) == {"cross_entropy"}
    assert set(SegmentTask(TrainParams(dice_weight=0.0)).loss(model, images, targets)) == {"cross_entropy"}
    wrong = torch.where(targets == 255, targets, (targets + 1) % (K + 1))  # every valid pixel wrong
    losses = SegmentTask(TrainParams(dice_weight=0.5)).loss(model, images, wrong)
    assert set(losses) == {"cross_entropy", "dice"}
    assert float(losses["dice"]) == pytest.approx(0.5 * float(soft_dice_loss(model(images), wrong)))
    assert float(losses["dice"]) > 0.45  # nearly 0.5 * 1: no overlap at all
    assert get_task("segment", TrainParams(dice_weight=2.0)).dice_weight == 2.0


# --- the contract ----------------------------------------------------------------------------------

def test_registry_and_model_directory_predictor(tmp_path):
    task = get_task("segment")
    assert isinstance(task, SegmentTask) and task.primary_metric == "val_miou"
    params = train_params(width=0.25)
    model = task.build_model(params, K, pretrained=False)
    torch.save(model.state_dict(), tmp_path / MODEL_FILE)
    meta = {"task": "segment", "arch": "unet", "num_classes": K, "classes": ["a", "b", "c"], "image_size": 64,
            "params": params.model_dump(mode="json")}
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    predictor = load_predictor(tmp_path)
    (pred,) = predictor.predict([np.zeros((40, 70, 3), np.uint8)])
    assert pred["mask"].shape == (40, 70) and pred["mask"].dtype == np.uint8
    model.eval()
    expected = task.predict(model, [np.zeros((40, 70, 3), np.uint8)], task.build_transforms(params)[1],
                            torch.device("cpu"))[0]["mask"]
    np.testing.assert_array_equal(pred["mask"], expected)


def _reference_mask(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """What resize_argmax must give: torch's bilinear resize of every class, then argmax."""
    full = F.interpolate(torch.from_numpy(logits)[None], size=(height, width), mode="bilinear", align_corners=False)
    return full[0].argmax(0).numpy().astype(np.uint8)


def _object_logits(classes: int, side: int, seed: int) -> np.ndarray:
    """What a trained segmenter gives: a few discs of different classes on background, soft
    edges, a little noise (classes change only at the discs' edges)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    label = np.zeros((side, side), np.int64)
    for c in range(1, classes):
        cy, cx, r = rng.uniform(0, side, 2).tolist() + [rng.uniform(0.08, 0.2) * side]
        label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
    onehot = (label[None] == np.arange(classes)[:, None, None]).astype(np.float32) * 6
    smooth = F.avg_pool2d(torch.from_numpy(onehot)[None], 5, 1, 2)[0].numpy()
    return (smooth + rng.normal(0, 0.3, smooth.shape)).astype(np.float32)


@pytest.mark.parametrize("side,height,width", [(96, 128, 128), (96, 480, 640), (64, 1080, 1920), (96, 97, 300),
                                               (96, 64, 48), (96, 96, 96)])
def test_resize_argmax_is_torchs_bilinear_then_argmax_pixel_for_pixel(monkeypatch, side, height, width):
    from visionflow.tasks import segment

    dense = []
    interpolate = F.interpolate
    monkeypatch.setattr(segment.F, "interpolate", lambda *a, **k: dense.append(1) or interpolate(*a, **k))
    rng = np.random.default_rng(side + height)
    cases = {
        "objects": _object_logits(5, side, seed=height),  # the edges-only path when enlarging 2x or more
        "noise": rng.normal(size=(5, side, side)).astype(np.float32),  # a random-init model: the dense path
        "ties": np.zeros((5, side, side), np.float32),  # every class tied, and classes 2 and 3 in a square
    }
    cases["ties"][2:4, side // 4:side // 2, side // 3:side // 2] = 1.0  # the first maximum wins on both paths
    for name, logits in cases.items():
        dense.clear()
        got = segment.resize_argmax(logits, height, width)
        used_dense = bool(dense)
        assert got.dtype == np.uint8 and got.shape == (height, width)
        np.testing.assert_array_equal(got, _reference_mask(logits, height, width), err_msg=name)
        enlarged = height * width >= 2 * side * side
        if name == "noise" or not enlarged:
            assert used_dense, f"{name}: the dense path"
        else:
            assert not used_dense, f"{name}: enlarged with few class edges, no dense resize"


def test_upsampled_mask_crops_the_letterbox_padding_before_resizing():
    from visionflow.tasks.segment import upsampled_mask
    from visionflow.training.augment import input_frame, resize_steps

    logits = torch.from_numpy(_object_logits(4, 64, seed=3))
    frame = input_frame(resize_steps(64, "letterbox"), 300, 600)  # 64 x 32 of content, padded above and below
    assert frame.rows < 64
    crop = logits[:, frame.top:frame.top + frame.rows, frame.left:frame.left + frame.cols].contiguous().numpy()
    np.testing.assert_array_equal(upsampled_mask(logits, frame), _reference_mask(crop, 300, 600))
