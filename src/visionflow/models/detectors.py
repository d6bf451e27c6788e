"""Detectors for the detect task: torchvision models built without touching the network.

Named archs (fasterrcnn_resnet50_fpn_v2, ...) are torchvision's own builders called with
weights=None, weights_backbone=None. The family names fasterrcnn / retinanet / fcos / maskrcnn
put the same heads on `params.backbone` (default resnet50) with an FPN:
    ResNet     torchvision's resnet_fpn_backbone (R-CNN: C2-C5 + max-pool level, strides 4-64;
               RetinaNet/FCOS: C3-C5 + P6/P7, strides 8-128, as torchvision builds them)
    MobileNet  an FPN on the last block of each of the strides 8, 16, 32 (+ max-pool level, or
               P6/P7 for RetinaNet/FCOS), `params.width` as width_mult. torchvision's own
               mobilenet FPN taps two stride-32 layers only, too coarse for small images.

Model input: a list of (3, S, S) float tensors in [0, 1], S = image_size (with train.resize: fit,
(3, H, W) slices of a batch padded to its largest image, whose longest side is S). The internal
transform normalises (ImageNet mean/std; SSDlite keeps torchvision's [-1, 1] scaling, which its
COCO weights expect) and never resizes (min_size = max_size = S). Outputs are in those input pixels.

Weights (never downloaded; enum names come from torchvision's cache, see visionflow.models.classifiers):
    weights           whole model (e.g. COCO_V1, or a state-dict file). Every tensor is loaded;
                      class-specific head tensors whose shape differs (COCO's 91 classes vs our
                      K + 1) keep their fresh initialisation, which is what loading into the
                      COCO-sized model and then replacing the heads gives.
    backbone_weights  ImageNet weights of the backbone network (ignored when `weights` is set:
                      the whole-model state covers the backbone).
With either configured, the backbone's BatchNorm layers are frozen (FrozenBatchNorm2d, as
torchvision's builders do for pretrained backbones). The structure depends on params only, never
on `pretrained`, so `pretrained=False` rebuilds a model that a trained state dict loads into.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Optional

from torch import nn

from visionflow.core.config import ARCHS, ModelParams
from visionflow.core.errors import UserError
from visionflow.models import load_torchvision

log = logging.getLogger(__name__)

FAMILIES = ("fasterrcnn", "retinanet", "fcos", "maskrcnn")
MASK_ARCHS = ("maskrcnn_resnet50_fpn_v2", "maskrcnn")
SSDLITE = "ssdlite320_mobilenet_v3_large"
NAMED_BACKBONES = {
    "fasterrcnn_resnet50_fpn_v2": "resnet50", "fasterrcnn_mobilenet_v3_large_fpn": "mobilenet_v3_large",
    "retinanet_resnet50_fpn_v2": "resnet50", "fcos_resnet50_fpn": "resnet50",
    SSDLITE: "mobilenet_v3_large", "maskrcnn_resnet50_fpn_v2": "resnet50",
}
# State-dict prefixes of the layers whose shapes depend on the number of classes.
CLASS_HEADS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.",
               "head.classification_head.cls_logits.", "head.classification_head.module_list.")
# R-CNN anchors on the MobileNet FPN levels (strides 8, 16, 32, 64): 2x and 4x the stride, so
# objects of ~12 px (small shapes at 96 px) still have an anchor they overlap well.
MOBILENET_RCNN_ANCHORS = ((16, 32), (32, 64), (64, 128), (128, 256))


def is_mask_arch(arch: str) -> bool:
    return arch in MASK_ARCHS


def backbone_name(params: ModelParams) -> str:
    if params.arch in FAMILIES:
        return params.backbone or "resnet50"
    own = NAMED_BACKBONES[params.arch]
    if params.backbone not in (None, own):
        family = next(f for f in FAMILIES if params.arch.startswith(f))
        raise UserError(f"train.model.backbone: {params.arch} is built on {own}, not {params.backbone}; "
                        f"use arch {family!r} to choose the backbone")
    return own


def build_detector(params: ModelParams, image_size: int, num_classes: int, pretrained: bool = True) -> nn.Module:
    """A torchvision detector for `num_classes` categories; label 0 is background, so category c
    is label c + 1. `pretrained=False` ignores both kinds of weights."""
    load_torchvision()
    arch = params.arch
    if arch not in ARCHS["detect"]:
        raise UserError(f"train.model.arch: {arch!r} is not a detect architecture; choose one of {', '.join(ARCHS['detect'])}")
    backbone = backbone_name(params)
    if params.width != 1.0 and not (backbone.startswith("mobilenet") and arch in FAMILIES + (SSDLITE,)):
        raise UserError(f"train.model.width: {arch} on {backbone} has no width multiplier; use 1.0 "
                        "(width applies to MobileNet backbones of fasterrcnn/retinanet/fcos/maskrcnn/ssdlite)")
    frozen_bn = params.weights is not None or params.backbone_weights is not None
    backbone_state, source, where = None, "", "random initialisation"
    if pretrained and params.backbone_weights and not params.weights:
        backbone_state, source = _read_weights(backbone, params.backbone_weights, "backbone_weights")
        where = f"{backbone} backbone weights from {source}"

    num_labels = num_classes + 1
    if arch == SSDLITE:
        model = _ssdlite(params, image_size, num_labels, frozen_bn, backbone_state, source)
    else:
        model = _family(params, backbone, image_size, num_labels) if arch in FAMILIES else \
            _named(arch, num_labels, _rcnn_kwargs(params, image_size) if "rcnn" in arch else _dense_kwargs(params, image_size))
        body = model.backbone.body
        if frozen_bn:
            _freeze_batchnorm(body)
        if backbone_state is not None:
            _load_backbone(body, backbone_state, backbone, source)
        _freeze_stages(body, params.trainable_backbone_layers)
    if pretrained and params.weights:
        where = _load_whole_model(model, params, num_labels)
    if not pretrained:  # rebuilt to load a trained model's weights: not news to the user
        where = "architecture only, for trained weights (pretrained=False)"
    log.log(logging.INFO if pretrained else logging.DEBUG, "detector %s on %s (%d classes + background, %d px): %s",
            arch, backbone, num_classes, image_size, where)
    return model


# --- builders --------------------------------------------------------------------------------

def _rcnn_kwargs(params: ModelParams, image_size: int) -> dict[str, Any]:
    # torchvision's proposal and RoI-sample counts are sized for ~800 px images; they scale with
    # the image area here (floors below), else the box head dominates the cost of small images.
    area = min(1.0, (image_size / 800) ** 2)
    return {**_transform_kwargs(image_size), "box_score_thresh": params.score_threshold,
            "box_detections_per_img": params.detections_per_image,
            "rpn_post_nms_top_n_train": max(200, round(2000 * area)),
            "rpn_post_nms_top_n_test": max(100, round(1000 * area)),
            "box_batch_size_per_image": max(32, round(512 * area))}


def _dense_kwargs(params: ModelParams, image_size: int) -> dict[str, Any]:
    return {**_transform_kwargs(image_size), "score_thresh": params.score_threshold,
            "detections_per_img": params.detections_per_image}


def _transform_kwargs(image_size: int) -> dict[str, Any]:
    from visionflow.training.augment import IMAGENET_MEAN, IMAGENET_STD

    # Images arrive resized to S x S by the data pipeline: min_size = max_size = S keeps them so.
    return {"min_size": image_size, "max_size": image_size, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD)}


def _named(arch: str, num_labels: int, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=num_labels, **kwargs)


def _family(params: ModelParams, backbone: str, image_size: int, num_labels: int) -> nn.Module:
    from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.retinanet import RetinaNetHead, _default_anchorgen
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    arch = params.arch
    dense = arch in ("retinanet", "fcos")
    extra = LastLevelP6P7(256, 256) if dense else None
    if backbone.startswith("resnet"):
        net = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5,
                                  returned_layers=[2, 3, 4] if dense else None, extra_blocks=extra)
        rcnn: dict[str, Any] = {}  # torchvision's anchors and RoI poolers for C2-C5 + pool
    else:
        net = _mobilenet_fpn(backbone, params.width, extra)
        levels = ["0", "1", "2"]
        rcnn = {"rpn_anchor_generator": AnchorGenerator(MOBILENET_RCNN_ANCHORS, ((0.5, 1.0, 2.0),) * 4),
                "box_roi_pool": MultiScaleRoIAlign(levels, 7, 2)}
        if arch == "maskrcnn":
            rcnn["mask_roi_pool"] = MultiScaleRoIAlign(levels, 14, 2)
    if arch == "fcos":
        return FCOS(net, num_labels, **_dense_kwargs(params, image_size))
    if arch == "retinanet":  # torchvision's v2 recipe: GroupNorm head, GIoU box loss
        anchors = _default_anchorgen()
        head = RetinaNetHead(net.out_channels, anchors.num_anchors_per_location()[0], num_labels,
                             norm_layer=partial(nn.GroupNorm, 32))
        head.regression_head._loss_type = "giou"
        return RetinaNet(net, num_labels, anchor_generator=anchors, head=head, **_dense_kwargs(params, image_size))
    cls = MaskRCNN if arch == "maskrcnn" else FasterRCNN
    return cls(net, num_labels, **rcnn, **_rcnn_kwargs(params, image_size))


def _mobilenet_fpn(name: str, width: float, extra_blocks: Optional[nn.Module]) -> nn.Module:
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    features = torchvision.models.get_model(name, weights=None, width_mult=width).features
    # Blocks flagged _is_cn start a new stride (4, 8, 16, 32); the block before each start is the
    # last one at the previous stride. C3, C4, C5 = last blocks at strides 8, 16, 32.
    starts = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
    taps = [starts[2] - 1, starts[3] - 1, len(features) - 1]
    return BackboneWithFPN(features, {str(i): str(k) for k, i in enumerate(taps)},
                           [features[i].out_channels for i in taps], 256,
                           extra_blocks=extra_blocks or LastLevelMaxPool())


def _ssdlite(params: ModelParams, image_size: int, num_labels: int, frozen_bn: bool,
             backbone_state: Optional[dict], source: str) -> nn.Module:
    """torchvision's ssdlite320_mobilenet_v3_large at S x S, built here so ImageNet backbone
    weights go into the MobileNet before it is split into the SSD feature extractor."""
    import torchvision
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection import ssdlite
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD
    from torchvision.ops.misc import FrozenBatchNorm2d

    bn = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    # torchvision halves the last stage ("reduced tail") unless ImageNet weights are used.
    full_tail = params.backbone_weights is not None and params.weights is None
    base = torchvision.models.mobilenet_v3_large(
        weights=None, norm_layer=partial(FrozenBatchNorm2d, eps=0.001) if frozen_bn else bn,
        reduced_tail=not full_tail, width_mult=params.width)
    if backbone_state is not None:
        _load_backbone(base, backbone_state, "mobilenet_v3_large", source)
    else:
        ssdlite._normal_init(base)
    trainable = 6 if params.trainable_backbone_layers is None else params.trainable_backbone_layers
    backbone = ssdlite._mobilenet_extractor(base, trainable, bn)
    size = (image_size, image_size)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    out_channels = det_utils.retrieve_out_channels(backbone, size)
    head = ssdlite.SSDLiteHead(out_channels, anchors.num_anchors_per_location(), num_labels, bn)
    return SSD(backbone, anchors, size, num_labels, head=head, score_thresh=params.score_threshold,
               nms_thresh=0.55, detections_per_img=params.detections_per_image, topk_candidates=300,
               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


# --- weights ---------------------------------------------------------------------------------

def _read_weights(arch: str, weights: str, key: str) -> tuple[dict, str]:
    from visionflow.models.classifiers import _load_state_dict

    try:
        return _load_state_dict(arch, weights)
    except UserError as exc:  # its messages name train.model.weights
        raise UserError(str(exc).replace("train.model.weights", f"train.model.{key}", 1)) from None


def _is_file(weights: str) -> bool:
    path = Path(weights)
    return path.suffix in {".pt", ".pth"} or path.exists()


def _load_backbone(net: nn.Module, state: dict, backbone: str, source: str) -> None:
    """ImageNet classifier state -> the backbone body (ResNet: drop fc; MobileNet: features.*)."""
    if isinstance(net, nn.ModuleDict) and backbone.startswith("mobilenet"):  # FPN body over `features`
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    elif isinstance(net, nn.ModuleDict):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches, e.g. a width multiplier other than the weights'
        raise UserError(f"train.model.backbone_weights: {source} does not fit {backbone} "
                        f"(is train.model.width 1.0?): {str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise UserError(f"train.model.backbone_weights: {source} is not a {backbone} state dict "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _load_whole_model(model: nn.Module, params: ModelParams, num_labels: int) -> str:
    if params.arch in FAMILIES and not _is_file(params.weights):
        raise UserError(f"train.model.weights: torchvision has no {params.weights!r} weights for {params.arch}; "
                        "give a state-dict file (.pt/.pth), or use backbone_weights for ImageNet weights")
    state, source = _read_weights(params.arch, params.weights, "weights")
    own = model.state_dict()
    counter = "num_batches_tracked"  # absent under FrozenBatchNorm2d
    missing = [k for k in own if k not in state and not k.endswith(counter)]
    unexpected = [k for k in state if k not in own and not k.endswith(counter)]
    if missing or unexpected:
        raise UserError(f"train.model.weights: {source} does not fit {params.arch} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    fresh = [k for k in own if k in state and state[k].shape != own[k].shape]
    wrong = [k for k in fresh if not k.startswith(CLASS_HEADS)]
    if wrong:
        raise UserError(f"train.model.weights: {source}: shapes differ outside the class heads, e.g. {wrong[0]} "
                        f"{tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}")
    model.load_state_dict({k: own[k] if k in fresh or k not in state else state[k] for k in own})
    note = f"; class heads re-initialised for {num_labels} labels ({len(fresh)} tensors)" if fresh else ""
    return f"whole-model weights from {source}{note}"


# --- freezing --------------------------------------------------------------------------------

def _freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm2d -> FrozenBatchNorm2d in place (same state-dict keys, less the batch counter;
    both start at weight 1, bias 0, mean 0, var 1, so nothing needs copying)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _freeze_batchnorm(child)


def _freeze_stages(body: nn.ModuleDict, trainable: Optional[int]) -> None:
    """Train only the last `trainable` stages of the backbone body (None: all), counted as
    torchvision does: ResNet stem, layer1-4; MobileNet stem, each stride, the last 1x1 conv."""
    if trainable is None:
        return
    names, blocks = list(body.keys()), list(body.values())
    if "layer1" in names:
        starts = [0] + [names.index(f"layer{i}") for i in range(1, 5)]
    else:
        starts = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
    if trainable > len(starts):
        raise UserError(f"train.model.trainable_backbone_layers: {trainable} > the backbone's {len(starts)} stages")
    first_trained = len(blocks) if trainable == 0 else starts[len(starts) - trainable]
    for block in blocks[:first_trained]:
        block.requires_grad_(False)
