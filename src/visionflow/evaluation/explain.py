"""What the network sees: class activation maps (CAMs) and first-layer filters (issue 14).

`explain(predictor, images)` gives one CAM per image for any task; the task contract says which
kind (Task.cam_kind), never the task's name:
    class   classifiers (classify, multilabel): Grad-CAM on the deepest convolutional block with
            an output at least MIN_CAM_GRID cells wide (ResNet layer4 at 224 px; shallower for
            small inputs), for the class's logit (softmax or sigmoid input). Default class: the
            prediction.
    boxes   detectors: EigenCAM (first principal component of the feature pyramid, the levels
            resized to one grid and stacked; sign-corrected) kept inside the predicted boxes of
            the class and renormalised in each box, so every box shows what in it the backbone
            responds to. Default class: that of the highest-scoring box. No box of the class:
            the whole-image EigenCAM.
    region  segmenters: Grad-CAM for the sum of the class's logits over the pixels predicted as
            the class (its predicted region; the whole image when nothing is). Default class:
            the class covering most pixels.
CAMs come from the maintained `grad-cam` package (pytorch_grad_cam). Images go through the
model's own eval transform; each CAM is mapped back to its image's own size (the letterbox
padding cropped off first, when the model was trained letterboxed).

`render_overlay`, `render_grid` and `render_filters` draw the figures `visionflow explain`
writes; `first_layer` returns the learned first convolution's kernels and feature maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from visionflow.core.errors import UserError

MIN_CAM_GRID = 6  # classifiers: the CAM's layer is the deepest whose output is at least this many cells wide
PYRAMID_GRID = 48  # detect: the feature pyramid's levels are resized to at most this grid (SVD cost)


@dataclass
class Explanation:
    """One image's CAM. cam: (H, W) float32 in 0..1 in the image's own pixels; target: the class
    the CAM is for; predicted: the model's answer in words; boxes: detect, the boxes (image pixels,
    xyxy) the CAM was kept in; region: segment, whether the class had a predicted region."""
    cam: np.ndarray
    target: str
    predicted: str
    method: str
    boxes: list[list[float]] = field(default_factory=list)
    region: Optional[bool] = None


def explain(predictor, images: Sequence[np.ndarray], class_name: Optional[str] = None,
            min_score: float = 0.5, batch_size: int = 8) -> list[Explanation]:
    """CAMs of RGB uint8 images through a ModelPredictor (deploy.predictor): `class_name` is the
    class to explain (default: each image's prediction); detect keeps boxes scoring >= min_score."""
    classes = list(predictor.meta["classes"])
    category = class_index(classes, class_name)
    kind = getattr(predictor.task, "cam_kind", "class")
    run = {"class": _class_cams, "boxes": _box_cams, "region": _region_cams}[kind]
    out: list[Explanation] = []
    for i in range(0, len(images), batch_size):
        chunk = [_rgb(im) for im in images[i:i + batch_size]]
        batch = model_input(chunk, predictor.transform).to(predictor.device)
        for image, (cam, extra) in zip(chunk, run(predictor, chunk, batch, category, classes, min_score)):
            frame = _frame(predictor.transform, *image.shape[:2])
            extra["boxes"] = [[float(v) for v in b] for b in frame.to_image(np.asarray(extra.get("boxes", []))
                                                                                     .reshape(-1, 4))]
            out.append(Explanation(cam=_to_image(cam, frame), **extra))
    return out


def model_input(images: Sequence[np.ndarray], transform) -> torch.Tensor:
    """RGB uint8 images through the model's eval transform -> (B, 3, S, S) float32 (a pipeline
    that carries boxes, as detect's does, is given none; resize: fit pads to the largest)."""
    boxes = getattr(transform, "processors", {}).get("bboxes")
    fields = {}
    if boxes is not None:
        fields = {"bboxes": np.zeros((0, 4), dtype=np.float32),
                  **{name: [] for name in (boxes.params.label_fields or [])}}
    from visionflow.training.augment import batch_chw

    return torch.from_numpy(batch_chw([transform(image=im, **fields)["image"] for im in images]))  # fit: padded


def class_index(classes: Sequence[str], name: Optional[str]) -> Optional[int]:
    if name is None:
        return None
    if name not in classes:
        raise UserError(f"--class {name!r}: the model has no such class; its classes are {', '.join(classes)}")
    return list(classes).index(name)


# --- the three kinds --------------------------------------------------------------------------

def _class_cams(predictor, images, batch: torch.Tensor, category, classes, min_score):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    preds = predictor.predict(images, batch_size=max(1, len(images)))  # the task's own post-processing
    chosen = [category if category is not None else int(p.get("label", np.argmax(p["probs"]))) for p in preds]
    with GradCAM(predictor.model, [classifier_layer(predictor.model, batch)]) as cam, torch.enable_grad():
        maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(k) for k in chosen])
    return [(m, {"target": classes[k], "method": "Grad-CAM", "predicted": _predicted(p, classes)})
            for m, k, p in zip(maps, chosen, preds)]


def _predicted(p: dict[str, Any], classes) -> str:
    if "labels" in p:  # multilabel: the classes at or above their thresholds
        named = [f"{classes[k]} {s:.2f}" for k, s in zip(p["labels"], p["scores"])]
        return ", ".join(named) or "no class above its threshold"
    return f"{classes[p['label']]} ({p['confidence']:.2f})"


def _region_cams(predictor, images, batch: torch.Tensor, category, classes, min_score):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    model = predictor.model
    with torch.no_grad():
        labels = model(batch).argmax(1).cpu().numpy()  # (B, S, S): 0 background, c + 1 class c
    targets, extras = [], []
    for lab in labels:
        counts = np.bincount(lab.ravel(), minlength=len(classes) + 1)[1:]
        k = category if category is not None else int(counts.argmax())
        region = lab == k + 1
        found = bool(region.any())
        targets.append(SemanticSegmentationTarget(k + 1, (region if found else np.ones_like(region)).astype(np.float32)))
        shown = [f"{classes[c]} {counts[c] / lab.size:.0%}" for c in np.argsort(-counts) if counts[c]][:3]
        extras.append({"target": classes[k], "method": "Grad-CAM (class region)", "region": found,
                       "predicted": ", ".join(shown) or "background only"})
    with GradCAM(model, [segmenter_layer(model)]) as cam, torch.enable_grad():
        maps = cam(input_tensor=batch, targets=targets)
    return list(zip(maps, extras))


def _box_cams(predictor, images, batch: torch.Tensor, category, classes, min_score):
    from pytorch_grad_cam import EigenCAM
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    model = predictor.model
    class SignedEigenCAM(EigenCAM):  # the SVD's sign is arbitrary: the library flips it back
        def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth):
            return get_2d_projection_with_sign_correction(activations)

    with SignedEigenCAM(model, [model.backbone], reshape_transform=_pyramid) as cam, torch.no_grad():
        maps = cam(input_tensor=batch, targets=[_Unused()] * len(batch))
        outputs = cam.outputs
    out = []
    for m, o in zip(maps, outputs):
        scores, labels, boxes = (o[k].detach().cpu().numpy() for k in ("scores", "labels", "boxes"))
        keep = scores >= min_score
        k = category if category is not None else (int(labels[keep][scores[keep].argmax()]) - 1 if keep.any() else None)
        chosen = boxes[keep & (labels == (k if k is not None else -2) + 1)]
        shown = [f"{classes[int(lab) - 1]} {s:.2f}" for lab, s in zip(labels[keep], scores[keep])][:3]
        target = classes[k] if len(chosen) else f"{classes[k] + ': ' if k is not None else ''}no box, whole image"
        extra = {"target": target, "method": "EigenCAM (in boxes)",
                 "predicted": ", ".join(shown) + (" ..." if keep.sum() > 3 else "") or "no box", "boxes": chosen}
        out.append((in_boxes(m, chosen) if len(chosen) else m, extra))
    return out


class _Unused:
    """EigenCAM uses no gradients, so no target; the library wants one per image."""

    def __call__(self, output):
        return output


def _pyramid(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """A detector backbone's feature levels -> one (B, sum C, g, g) tensor: |features| of every
    level resized to the finest level's grid (at most PYRAMID_GRID) and stacked."""
    levels = list(features.values()) if isinstance(features, dict) else [features]
    h, w = levels[0].shape[-2:]
    scale = min(1.0, PYRAMID_GRID / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return torch.cat([nn.functional.interpolate(v.abs(), size, mode="bilinear", align_corners=False)
                      for v in levels], 1)


def in_boxes(cam: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The CAM kept inside the boxes (xyxy, the CAM's pixels) and rescaled to 0..1 in each box;
    0 outside every box (pytorch_grad_cam's renormalize_cam_in_bounding_boxes, without drawing)."""
    out = np.zeros_like(cam, dtype=np.float32)
    h, w = cam.shape
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c1, r1 = int(np.clip(np.floor(x1), 0, w - 1)), int(np.clip(np.floor(y1), 0, h - 1))
        c2, r2 = int(np.clip(np.ceil(x2), c1 + 1, w)), int(np.clip(np.ceil(y2), r1 + 1, h))
        part = cam[r1:r2, c1:c2].astype(np.float32)
        span = float(part.max() - part.min())
        part = (part - part.min()) / span if span > 0 else np.ones_like(part)
        out[r1:r2, c1:c2] = np.maximum(out[r1:r2, c1:c2], part)
    return out


# --- target layers ------------------------------------------------------------------------------

def classifier_layer(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """The deepest convolutional block of a torchvision classifier whose output is at least
    MIN_CAM_GRID cells on a side for this input size (ResNet layer1..layer4, the blocks of
    `features` for MobileNet, EfficientNet, VGG): layer4 at 224 px (7 x 7), a shallower block for
    small inputs, where the last one is 2 x 2 or 3 x 3 and its CAM says little about where. No
    block that fine: the finest. Any other model: its last Conv2d."""
    if hasattr(model, "layer4"):
        blocks = [model.layer1[-1], model.layer2[-1], model.layer3[-1], model.layer4[-1]]
    elif isinstance(getattr(model, "features", None), nn.Sequential):
        blocks = list(model.features)
    else:
        return last_conv(model)
    sides: dict[int, int] = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: sides.__setitem__(k, min(o.shape[-2:])))
             for k, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(batch[:1])
    finally:
        for h in hooks:
            h.remove()
    fine = [k for k in range(len(blocks)) if sides.get(k, 0) >= MIN_CAM_GRID]
    return blocks[fine[-1] if fine else 0]


def segmenter_layer(model: nn.Module) -> nn.Module:
    """U-Net: the last decoder block (full resolution: the features the 1x1 head reads). Its
    deeper blocks gave maps with almost no mass on the object for a small, briefly trained U-Net
    (measured: under 15% inside the square the model segments, 97% here). A torchvision segmenter:
    the last block of its backbone (ResNet layer4, MobileNet's last), as pytorch-grad-cam's own
    segmentation example."""
    if hasattr(model, "decoder") and hasattr(model, "head"):
        return model.decoder[-1]
    net = getattr(model, "net", model)
    if hasattr(net, "backbone"):
        return list(net.backbone.children())[-1]
    return last_conv(model)


def last_conv(model: nn.Module) -> nn.Module:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError(f"{model.__class__.__name__} has no convolution to explain")
    return convs[-1]


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first convolution that takes the RGB image (3 input channels)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            return m
    raise UserError(f"{model.__class__.__name__} has no convolution on the RGB image")


# --- back to the image's pixels -------------------------------------------------------------------

class _Stretch:
    """Where an image lands in an S x S input resized without keeping the aspect ratio."""

    def __init__(self, height: int, width: int, size: int):
        self.height, self.width, self.size = height, width, size

    def crop(self, dense):
        return dense

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
        b[:, 0::2] = (b[:, 0::2] * self.width / self.size).clip(0, self.width)
        b[:, 1::2] = (b[:, 1::2] * self.height / self.size).clip(0, self.height)
        return b


def _frame(transform, height: int, width: int):
    try:  # the letterbox-aware geometry of the eval transform, where the project has it
        from visionflow.training.augment import input_frame
    except ImportError:
        input_frame = None
    if input_frame is not None:
        return input_frame(transform, height, width)
    size = next(t.height for t in transform.transforms if hasattr(t, "height"))
    return _Stretch(height, width, size)


def _to_image(cam: np.ndarray, frame) -> np.ndarray:
    import cv2

    part = np.ascontiguousarray(frame.crop(np.asarray(cam, dtype=np.float32)))
    out = cv2.resize(part, (frame.width, frame.height), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _rgb(image: np.ndarray) -> np.ndarray:
    from visionflow.deploy.predictor import as_rgb

    return as_rgb(image)


# --- first-layer filters and feature maps --------------------------------------------------------

EDGE = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)  # Sobel, vertical edges
SHARPEN = np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], dtype=np.float32)


class _Stop(Exception):
    pass


def first_layer(predictor, image: np.ndarray, maps: int = 8) -> dict[str, Any]:
    """The first convolution's kernels (N, k, k, 3) scaled to 0..1 each, and its first `maps`
    feature maps of `image` through the eval transform ((maps, S, S), as the network computed
    them; the rest of the network is not run)."""
    conv = first_conv(predictor.model)
    seen: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        seen["maps"] = output.detach()
        raise _Stop

    handle = conv.register_forward_hook(hook)
    try:
        with torch.no_grad():
            predictor.model(model_input([_rgb(image)], predictor.transform).to(predictor.device))
    except _Stop:
        pass
    finally:
        handle.remove()
    w = conv.weight.detach().float().cpu().numpy().transpose(0, 2, 3, 1)  # (N, k, k, 3)
    lo, hi = w.min(axis=(1, 2, 3), keepdims=True), w.max(axis=(1, 2, 3), keepdims=True)
    kernels = (w - lo) / np.maximum(hi - lo, 1e-12)
    fmap = seen["maps"][0].float().cpu().numpy()
    strongest = np.argsort(-fmap.std(axis=(1, 2)))[:maps]  # the most varied maps show the most
    return {"kernels": kernels, "maps": fmap[np.sort(strongest)], "map_ids": np.sort(strongest).tolist(),
            "layer": f"{conv.in_channels}->{conv.out_channels}, {conv.kernel_size[0]}x{conv.kernel_size[1]}, "
                     f"stride {conv.stride[0]}"}


def hand_filters(image: np.ndarray) -> dict[str, np.ndarray]:
    """What the textbook kernels do to the image (grey): edges (Sobel), sharpening."""
    import cv2

    grey = cv2.cvtColor(_rgb(image), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    return {"edges (Sobel)": np.abs(cv2.filter2D(grey, -1, EDGE)) + np.abs(cv2.filter2D(grey, -1, EDGE.T)),
            "sharpen": np.clip(cv2.filter2D(grey, -1, SHARPEN), 0, 1)}


# --- figures --------------------------------------------------------------------------------------

def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The CAM as a jet heatmap blended over the image (uint8 RGB, the image's size)."""
    import cv2

    heat = cv2.applyColorMap(np.uint8(255 * np.clip(cam, 0, 1)), cv2.COLORMAP_JET)[:, :, ::-1]
    return np.uint8(np.clip((1 - alpha) * _rgb(image).astype(np.float32) + alpha * heat, 0, 255))


def _caption(e: Explanation, true: Optional[str]) -> str:
    lines = [f"true: {true}" if true else None, f"predicted: {e.predicted}", f"CAM for: {e.target}"]
    return "\n".join(x for x in lines if x)


def _plt():
    from visionflow.evaluation.figures import _plt as plt

    return plt()


def render_overlay(image: np.ndarray, e: Explanation, path: Path, true: Optional[str] = None,
                   title: str = "") -> Path:
    """Image | CAM overlay, with the true class (when known), the prediction and the CAM's class."""
    import matplotlib.patches as patches

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.6))
    axes[0].imshow(_rgb(image))
    axes[0].set_title(title or "image", fontsize=9)
    axes[1].imshow(overlay(image, e.cam))
    axes[1].set_title(f"{e.method}\n{_caption(e, true)}", fontsize=9)
    for x1, y1, x2, y2 in e.boxes:
        axes[1].add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", lw=1.5))
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def render_grid(images: Sequence[np.ndarray], explanations: Sequence[Explanation], path: Path,
                trues: Optional[Sequence[Optional[str]]] = None, columns: int = 4) -> Path:
    """The CAM overlays of many images in one figure (true, predicted and CAM class under each)."""
    plt = _plt()
    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.5 * rows), squeeze=False)
    trues = list(trues) if trues is not None else [None] * n
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, e, true in zip(axes.ravel(), images, explanations, trues):
        ax.imshow(overlay(image, e.cam))
        ax.set_title(_caption(e, true), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def render_filters(predictor, image: np.ndarray, path: Path, max_kernels: int = 32, maps: int = 8) -> Path:
    """filters.png: the learned first-layer kernels as RGB tiles ("filters are operations"); the
    image, what a hand-made edge and sharpen kernel make of it, and the network's own first
    feature maps of it ("feature maps")."""
    learned = first_layer(predictor, image, maps)
    hand = hand_filters(image)
    kernels = learned["kernels"][:max_kernels]
    plt = _plt()
    cols = 8
    krows = -(-len(kernels) // cols)
    mrows = -(-len(learned["maps"]) // cols)
    fig, axes = plt.subplots(krows + 1 + mrows, cols, figsize=(1.6 * cols, 1.7 * (krows + 1 + mrows) + 0.6),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes[:krows].ravel(), kernels):
        ax.imshow(k, interpolation="nearest")
    axes[0, 0].set_title(f"learned first-layer kernels ({learned['layer']})", fontsize=9, loc="left")
    row = axes[krows]
    row[0].imshow(_rgb(image))
    row[0].set_title("image", fontsize=8)
    for ax, (name, shown) in zip(row[1:], hand.items()):
        ax.imshow(shown, cmap="gray")
        ax.set_title(name, fontsize=8)
    for ax, m, i in zip(axes[krows + 1:].ravel(), learned["maps"], learned["map_ids"]):
        ax.imshow(m, cmap="viridis")
        ax.set_title(f"feature map {i}", fontsize=8)
    fig.suptitle("filters are operations: hand-made kernels next to the learned ones, and the network's "
                 "first feature maps of the image", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# --- `visionflow explain` -------------------------------------------------------------------------

def explain_images(predictor, items: Sequence[tuple[str, np.ndarray]], out: Path, class_name: Optional[str] = None,
                   filters: bool = False, min_score: float = 0.5, grid_max: int = 16) -> dict[str, Any]:
    """(name, RGB image) pairs -> out/<stem>.png per image (image | CAM overlay, true class when
    the image's folder is named after a class, prediction, CAM class), out/grid.png (the first
    `grid_max`), and with `filters` out/filters.png of the first image. Returns what was written."""
    classes = list(predictor.meta["classes"])
    class_index(classes, class_name)  # an unknown class fails before any work
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in items]
    images = [im for _, im in items]
    explanations = explain(predictor, images, class_name, min_score)
    trues = [Path(n).parent.name if Path(n).parent.name in classes else None for n in names]
    written, used = [], set()
    for name, image, e, true in zip(names, images, explanations, trues):
        stem = Path(name).stem
        file = stem if stem not in used else f"{stem}-{len(used)}"
        used.add(file)
        written.append(str(render_overlay(image, e, out / f"{file}.png", true, title=Path(name).name)))
    grid = render_grid(images[:grid_max], explanations[:grid_max], out / "grid.png", trues[:grid_max])
    result = {"task": predictor.meta["task"], "images": len(images), "overlays": written,
              "grid": str(grid), "method": explanations[0].method if explanations else None}
    if filters and images:
        result["filters"] = str(render_filters(predictor, images[0], out / "filters.png"))
    return result


# --- the evaluate stage ---------------------------------------------------------------------------

def explain_test_grid(predictor, samples: Sequence, root: Path, figures: Path, k: int,
                      min_score: float = 0.5) -> Optional[dict[str, Any]]:
    """The evaluate stage's CAMs: `k` test samples spread over the split (the same picks as its
    prediction grid) -> figures/explain_grid.png (each CAM over its image with the true classes,
    image-level labels where the sample has them, the prediction and the class explained), each
    CAM as an 8-bit grey PNG figures/cams/<n>.png and figures/cams.json {sample id: that file,
    relative to figures/} (the inspect stage stores them as FiftyOne Heatmap fields), and
    figures/filters.png of the first of them (render_filters). Detect: boxes scoring >= min_score. The register stage logs the
    figures folder to MLflow. None when k is 0 or there are no samples."""
    from PIL import Image

    from visionflow.core.files import write_json
    from visionflow.evaluation.report import grid_pick

    picks = sorted(grid_pick(len(samples), k))
    if not picks:
        return None
    classes = list(predictor.meta["classes"])
    chosen = [samples[i] for i in picks]
    images = [predictor.read(s.image_path(root)) for s in chosen]
    explained = explain(predictor, images, min_score=min_score)
    trues = [", ".join(classes[c] for c in sorted(set(s.labels)) if 0 <= c < len(classes)) or None for s in chosen]
    grid = render_grid(images, explained, figures / EXPLAIN_GRID, trues)
    (figures / "cams").mkdir(parents=True, exist_ok=True)
    files = {}
    for n, (s, e) in enumerate(zip(chosen, explained)):
        files[s.id] = f"cams/{n:04d}.png"
        Image.fromarray(np.uint8(np.round(255 * e.cam))).save(figures / files[s.id])
    write_json(figures / CAMS_INDEX, files)
    render_filters(predictor, images[0], figures / FILTERS)
    return {"figure": str(grid), "images": len(images), "method": explained[0].method}



EXPLAIN_GRID, CAMS_INDEX, FILTERS = "explain_grid.png", "cams.json", "filters.png"  # in the figures folder (stages/inspect.py reads the index)
