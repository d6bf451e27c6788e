"""Semantic segmenters: torchvision's FCN / DeepLabV3 / LR-ASPP and our own compact U-Net.

Every model maps images (B, 3, H, W), ImageNet-normalised, to logits (B, K + 1, H, W) at the
input resolution, as a plain tensor (torchvision's {"out": ...} dict is unwrapped by
`PlainLogits`, so ONNX / TorchScript export sees one output). Channel 0 is background, channel
c + 1 is category c (the segment task's target convention).

Weights (never downloaded; see visionflow.models.classifiers._load_state_dict):
    ModelParams.weights           the whole model: a torchvision enum name (e.g.
                                  COCO_WITH_VOC_LABELS_V1) found in the torchvision cache, or a
                                  state-dict file (torchvision's keys or ours). The classifier's
                                  last conv is re-initialised when its class count differs.
    ModelParams.backbone_weights  ImageNet weights of the backbone network (enum name or file).
Whole-model weights win over backbone weights. `trainable_backbone_layers` (0-5) freezes all but
the last N of the backbone's five stride stages, and only applies when weights were loaded.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from visionflow.core.config import BACKBONES, ModelParams
from visionflow.core.errors import UserError
from visionflow.models import load_torchvision
from visionflow.models.classifiers import _load_state_dict

log = logging.getLogger(__name__)

UNET_STRIDE = 32  # the U-Net's input must be a multiple of this; other sizes are padded
UNET_BASE_CHANNELS = 32  # channels at full resolution for width 1.0
# torchvision segmenter -> the backbone network it is built on
TORCHVISION_BACKBONES = {
    "fcn_resnet50": "resnet50", "deeplabv3_resnet50": "resnet50",
    "deeplabv3_mobilenet_v3_large": "mobilenet_v3_large", "lraspp_mobilenet_v3_large": "mobilenet_v3_large",
}
# Final classifier layers, re-initialised when loaded weights have another class count.
_HEAD_LAYERS = {
    "fcn_resnet50": ("net.classifier.4.",), "deeplabv3_resnet50": ("net.classifier.4.",),
    "deeplabv3_mobilenet_v3_large": ("net.classifier.4.",),
    "lraspp_mobilenet_v3_large": ("net.classifier.low_classifier.", "net.classifier.high_classifier."),
    "unet": ("head.",),
}
# MobileNet `features` indices where strides 4, 8, 16, 32 begin (stage boundaries).
_MOBILENET_CUTS = {"mobilenet_v2": (2, 4, 7, 14), "mobilenet_v3_large": (2, 4, 7, 13)}


def build_segmenter(params: ModelParams, num_classes: int, pretrained: bool = True) -> nn.Module:
    """`num_classes` = K categories; the model predicts K + 1 channels (0 = background).
    `pretrained=False` builds the architecture only (trained weights are loaded afterwards)."""
    load_torchvision()
    arch = params.arch
    # stages: the backbone's five stride stages (for trainable_backbone_layers); backbone_source:
    # where its ImageNet weights came from (None: not loaded)
    if arch == "unet":
        model, stages, backbone_source = _build_unet(params, num_classes + 1, pretrained)
    elif arch in TORCHVISION_BACKBONES:
        model, stages, backbone_source = _build_torchvision(params, num_classes + 1, pretrained)
    else:
        raise UserError(f"segment.train.model.arch: {arch!r} is not a segmenter; choose one of "
                        f"{', '.join([*TORCHVISION_BACKBONES, 'unet'])}")
    source = "random initialisation"
    if pretrained and params.weights:
        source = "whole-model weights from " + _load_whole(model, arch, params.weights)
        if params.backbone_weights:
            log.warning("segmenter %s: backbone_weights %s ignored: whole-model weights given", arch,
                        params.backbone_weights)
    elif backbone_source:
        source = f"{_backbone_name(params)} backbone weights from {backbone_source}"
    if source == "random initialisation":
        if pretrained and params.trainable_backbone_layers is not None:
            log.warning("segmenter %s: trainable_backbone_layers ignored (no pretrained weights)", arch)
    elif params.trainable_backbone_layers is not None:
        _freeze_stages(stages, params.trainable_backbone_layers)
    if not pretrained:  # rebuilt to load a trained model's weights: not news to the user
        source = "architecture only, for trained weights (pretrained=False)"
    log.log(logging.INFO if pretrained else logging.DEBUG, "segmenter %s%s, %d outputs: %s", arch, _describe(params),
            num_classes + 1, source)
    return model


def _describe(params: ModelParams) -> str:
    if params.arch != "unet":
        return ""
    return f" ({params.backbone or 'conv'} encoder, width {params.width:g})"


def _backbone_name(params: ModelParams) -> str:
    if params.arch == "unet":
        return params.backbone or "conv"
    return TORCHVISION_BACKBONES[params.arch]


def _weights(arch: str, weights: str, key: str) -> tuple[dict, str]:
    """_load_state_dict with the error naming the params key it came from."""
    try:
        return _load_state_dict(arch, weights)
    except UserError as exc:
        raise UserError(str(exc).replace("train.model.weights", f"segment.train.model.{key}", 1)) from None


# --- torchvision segmenters --------------------------------------------------------------------

class PlainLogits(nn.Module):
    """A torchvision segmenter returning its "out" logits (B, K + 1, H, W) as a plain tensor."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def _build_torchvision(params: ModelParams, num_outputs: int, pretrained: bool) -> tuple[nn.Module, list, Optional[str]]:
    import torchvision

    arch, backbone = params.arch, TORCHVISION_BACKBONES[params.arch]
    if params.backbone not in (None, backbone):
        raise UserError(f"segment.train.model.backbone: {arch} is built on {backbone}, not {params.backbone}; "
                        f"set backbone to null or {backbone}, or use arch unet for another encoder")
    if params.width != 1.0:
        raise UserError(f"segment.train.model.width: {arch} has a fixed width; width applies to arch unet only")
    kwargs = {} if arch.startswith("lraspp") else {"aux_loss": False}
    net = torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=num_outputs, **kwargs)
    model, where = PlainLogits(net), None
    if pretrained and params.backbone_weights and not params.weights:
        state, where = _weights(backbone, params.backbone_weights, "backbone_weights")
        if backbone.startswith("resnet"):  # backbone children: conv1, bn1, layer1..4
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        else:  # an IntermediateLayerGetter over `features`: children "0".."16"
            state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        _load_strict(net.backbone, state, where, "backbone_weights")
    return model, _torchvision_stages(net.backbone, backbone), where


def _torchvision_stages(backbone: nn.Module, name: str) -> list[list[nn.Module]]:
    if name.startswith("resnet"):
        return [[backbone.conv1, backbone.bn1], [backbone.layer1], [backbone.layer2], [backbone.layer3],
                [backbone.layer4]]
    return _split(list(backbone.children()), _MOBILENET_CUTS[name])


def _split(blocks: list[nn.Module], cuts: tuple[int, ...]) -> list[list[nn.Module]]:
    bounds = (0, *cuts, len(blocks))
    return [blocks[a:b] for a, b in zip(bounds, bounds[1:])]


# --- loading and freezing ------------------------------------------------------------------------

def _load_whole(model: nn.Module, arch: str, weights: str) -> str:
    if arch == "unet" and not _looks_like_file(weights):
        raise UserError(f"segment.train.model.weights: unet has no torchvision weights {weights!r}; "
                        f"give a state-dict file, or use backbone_weights for the encoder")
    state, where = _weights(arch, weights, "weights")
    if isinstance(model, PlainLogits) and not any(k.startswith("net.") for k in state):
        state = {"net." + k: v for k, v in state.items()}  # torchvision's own keys
    state = {k: v for k, v in state.items() if not k.startswith("net.aux_classifier.")}  # aux_loss is off
    own = model.state_dict()
    head = [k for k, v in state.items()
            if k.startswith(_HEAD_LAYERS[arch]) and k in own and v.shape != own[k].shape]
    for k in head:  # another class count: keep the fresh (K + 1)-class layer
        del state[k]
    _load_strict(model, state, where, "weights", skip=set(head))
    if head:
        log.info("segmenter %s: classifier layers %s re-initialised for %d outputs", arch,
                 sorted({k.rsplit(".", 1)[0] for k in head}), _num_outputs(model, arch))
    return where


def _num_outputs(model: nn.Module, arch: str) -> int:
    prefix = _HEAD_LAYERS[arch][0]
    return int(model.state_dict()[prefix + "weight"].shape[0])


def _looks_like_file(weights: str) -> bool:
    from pathlib import Path

    return Path(weights).suffix in {".pt", ".pth"} or Path(weights).exists()


def _load_strict(module: nn.Module, state: dict, where: str, key: str, skip: frozenset | set = frozenset()) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state) - set(skip))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{name} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise UserError(f"segment.train.model.{key}: {where} does not fit this model ({'; '.join(parts)}); "
                        f"check arch/backbone match the weights")
    module.load_state_dict(state, strict=False)


def _freeze_stages(stages: list, trainable: int) -> None:
    """Freeze all but the last `trainable` stages (parameters only: BatchNorm statistics still
    adapt, so a rebuilt model needs no other layer types to load the state dict)."""
    for stage in stages[:max(len(stages) - trainable, 0)]:
        for module in stage:
            for p in module.parameters():
                p.requires_grad_(False)


# --- U-Net ---------------------------------------------------------------------------------------

class ConvBlock(nn.Sequential):
    """Two 3x3 conv + BN + ReLU, resolution kept."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UpBlock(nn.Module):
    """x (B, cin, h, w) -> ConvTranspose2d x2 -> concat skip (B, cskip, 2h, 2w) -> ConvBlock -> (B, cout, 2h, 2w)."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = ConvBlock(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """Encoder of five stride-2 stages (strides 2..32) plus a full-resolution stem; a decoder of
    five UpBlocks back to stride 1, each joined with the skip of its resolution; a 1x1 head.

    Channels: base = round(32 * width) at full resolution, doubling per level up to 8 * base. Our
    own encoder (backbone: null) uses those widths too; a torchvision encoder keeps its ImageNet
    widths and `width` scales only the stem and the decoder.

    Inputs whose sides are not multiples of 32 are zero-padded right/bottom (zero = the mean
    colour after ImageNet normalisation) and the logits cropped back, so any size works and the
    output is always (B, num_outputs, H, W)."""

    def __init__(self, stem: nn.Module, stages: nn.ModuleList, channels: list[int], num_outputs: int,
                 base: int, stem_feeds_encoder: bool):
        super().__init__()
        # channels: [stem, stage1..stage5] output channels; decoder level i (stride 2^i) has dec[i]
        dec = [min(base * 2 ** i, 8 * base) for i in range(5)]
        self.stem, self.encoder = stem, stages
        self.stride = UNET_STRIDE  # an attribute, not the global, so TorchScript can compile forward
        self.stem_feeds_encoder = stem_feeds_encoder  # own encoder: yes; pretrained: sees the image
        self.decoder = nn.ModuleList(
            UpBlock(channels[5] if i == 4 else dec[i + 1], channels[i], dec[i]) for i in range(4, -1, -1))
        self.head = nn.Conv2d(dec[0], num_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        x = F.pad(x, [0, (-w) % self.stride, 0, (-h) % self.stride])
        skips = [self.stem(x)]
        y = skips[0] if self.stem_feeds_encoder else x
        for stage in self.encoder:
            y = stage(y)
            skips.append(y)
        for i, up in enumerate(self.decoder):
            y = up(y, skips[4 - i])
        return self.head(y)[:, :, :h, :w]


def _build_unet(params: ModelParams, num_outputs: int, pretrained: bool) -> tuple[UNet, list, Optional[str]]:
    base = max(8, round(UNET_BASE_CHANNELS * params.width))
    stem = ConvBlock(3, base)
    source = None
    if params.backbone is None:
        if params.backbone_weights:
            raise UserError("segment.train.model.backbone_weights: unet's own conv encoder (backbone: null) has "
                            f"no pretrained weights; set backbone (one of {', '.join(BACKBONES)}) or "
                            "backbone_weights: null")
        ch = [min(base * 2 ** i, 8 * base) for i in range(6)]
        stages = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), ConvBlock(ch[i - 1], ch[i])) for i in range(1, 6))
        channels = ch
    else:
        if params.backbone_weights is not None and pretrained and not params.weights:
            state, source = _weights(params.backbone, params.backbone_weights, "backbone_weights")
        else:
            state = None
        stages = nn.ModuleList(_pretrained_stages(params.backbone, state, source))
        channels = [base, *_stage_channels(stages)]
    model = UNet(stem, stages, channels, num_outputs, base, stem_feeds_encoder=params.backbone is None)
    # trainable_backbone_layers counts encoder stages; our own encoder starts at the stem (stride 1),
    # a pretrained one at the image (its stem is a decoder-side skip, trained from scratch).
    stage_lists = [[s] for s in stages]
    if params.backbone is None:
        stage_lists[0].insert(0, stem)
    return model, stage_lists, source


def _pretrained_stages(name: str, state: Optional[dict], where: Optional[str]) -> list[nn.Sequential]:
    """The backbone network's layers as five stages at strides 2, 4, 8, 16, 32 (classifier dropped).
    ImageNet weights are loaded into the whole torchvision network first, so every key is checked."""
    import torchvision

    net = torchvision.models.get_model(name, weights=None)
    if state is not None:
        _load_strict(net, state, where, "backbone_weights")
    if name.startswith("resnet"):
        return [nn.Sequential(net.conv1, net.bn1, net.relu), nn.Sequential(net.maxpool, net.layer1),
                net.layer2, net.layer3, net.layer4]
    return [nn.Sequential(*blocks) for blocks in _split(list(net.features), _MOBILENET_CUTS[name])]


@torch.no_grad()
def _stage_channels(stages: nn.ModuleList) -> list[int]:
    # Probed in eval mode so the dummy pass leaves BatchNorm statistics untouched.
    was_training = stages.training
    stages.eval()
    x, out = torch.zeros(1, 3, 64, 64), []
    for stage in stages:
        x = stage(x)
        out.append(x.shape[1])
    stages.train(was_training)
    return out
