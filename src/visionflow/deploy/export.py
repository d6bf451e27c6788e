"""Export a trained model folder (models/<task>/) to ONNX or TorchScript, and check that the
exported file predicts what the PyTorch model predicts.

Input of every exported graph (any task, any format):
    "images"  float32 (B, 3, S, S): RGB pixel values 0..255, already resized to S x S, S =
              meta["image_size"], by the model's own resize steps (`preprocess`, the eval
              transform's: stretch, bilinear, aspect ratio not kept; or letterbox, longest side
              bilinear to S, centred on an S x S canvas of 0). B is dynamic. Normalisation
              happens inside the graph.
The graph, its outputs (ONNX output names; TorchScript returns the same tensors in this order),
the formats it exports to and how parity compares it are the task's (the export face of
visionflow.tasks.base): classify `probs` (B, K); segment `logits` (B, K + 1, S, S) and `mask`
(B, S, S); detect a list of B dicts of boxes, labels, scores (+ masks), TorchScript only.

A sidecar `<file>.json` next to the export says all of this for the file at hand (`_describe`),
with the parity figures (`_self_check`, `check_parity`). docs/export.md has the user's view.
"""
from __future__ import annotations

import importlib.metadata
import logging
import threading
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from visionflow.core.errors import UserError
from visionflow.core.files import atomic_path, file_digest, read_json, write_json
from visionflow.deploy.references import META_FILE, MODEL_FILE, model_folder
from visionflow.tasks import get_task, task_of

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "auto")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript"}
INPUT_NAME = "images"
# Parity passes when max |PyTorch - export| <= TOLERANCE, compared on probabilities (classify;
# segment: per-pixel softmax of the logits) or on scores and box corners in pixels (detect), and
# the test metric differs by at most METRIC_TOLERANCE.
TOLERANCE, METRIC_TOLERANCE = 1e-3, 0.01
SELF_CHECK_BATCHES = (1, 3)  # the dynamic batch axis is run at these sizes before the file is kept


class ExportError(UserError):
    pass


# torch.jit.script and torch.export are not thread-safe. Two branches promoting side by side in one
# process (`visionflow run --task-runner threads`) would define the same TorchScript classes at once:
# one fails with "Can't redefine method: forward on class ...", and a class left half-defined fails
# every later export of that model in the process. One export writes at a time.
_WRITE_LOCK = threading.Lock()


# --- the graph: the task's model + the pre- and post-processing that travel inside the file ---

def build_graph(predictor) -> nn.Module:
    """The exported module of a loaded model folder (visionflow.deploy.predictor.ModelPredictor), eval mode."""
    return predictor.task.export_graph(predictor.model.cpu().eval(), predictor.meta)


# --- the input contract ------------------------------------------------------------------

def preprocess(images: Sequence[np.ndarray], image_size: int, resize: str = "stretch") -> np.ndarray:
    """RGB uint8 (H, W, 3) images of any size -> the exported graph's input, float32 (B, 3, S, S).
    `resize` is the model's (Task.input_resize): letterbox runs the eval transform's own steps,
    so the graph sees the pixels PyTorch sees; fit (detect) gives each image its longest side S,
    top-left in a batch padded with 0 to the largest (B, 3, H, W), as predict batches them."""
    import cv2

    from visionflow.deploy.predictor import as_rgb

    if resize == "stretch":
        return np.stack([cv2.resize(as_rgb(im), (image_size, image_size), interpolation=cv2.INTER_LINEAR)
                         .transpose(2, 0, 1) for im in images]).astype(np.float32)
    import albumentations as A

    from visionflow.training.augment import batch_chw, resize_steps

    steps = A.Compose(resize_steps(image_size, resize))
    return batch_chw([steps(image=as_rgb(im))["image"] for im in images]).astype(np.float32)


def _synthetic(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Deterministic noise images with one flat patch each, float32 (B, 3, S, S) in 0..255."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (batch, 3, size, size)).astype(np.float32)
    x[:, :, size // 4: size // 2, size // 4: size // 2] = rng.uniform(0, 255, (batch, 3, 1, 1))
    return x


# --- loading ------------------------------------------------------------------------------

def load_model_folder(model_dir: str | Path):
    """A model folder as a ModelPredictor (model in eval mode on the CPU); UserError if it is not one."""
    from pydantic import ValidationError

    from visionflow.deploy.predictor import load_predictor

    model_dir = model_folder(model_dir)
    try:
        return load_predictor(model_dir, "cpu")
    except ValidationError as exc:  # a folder written by an older visionflow
        err, task = exc.errors()[0], task_of(read_json(model_dir / META_FILE))
        raise UserError(f"{model_dir / META_FILE}: params.{'.'.join(map(str, err['loc']))}: {err['msg']}; this "
                        f"visionflow cannot rebuild the model, retrain it (visionflow stage train-{task})") from None


def resolve_format(task: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    allowed = get_task(task).export_formats
    if fmt == "auto":
        return allowed[0]
    if fmt not in allowed:
        raise UserError(f"{task} models export to {' or '.join(allowed)} only, not {fmt} (torchvision "
                        f"detectors return per-image lists of boxes, which ONNX exports for one fixed batch "
                        f"size at best); use --format {allowed[0]} or auto")
    return fmt


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def default_export_path(model_dir: str | Path, fmt: str) -> Path:
    """models/<task> -> models/exported/<task>.onnx (beside the DVC-tracked model folder, not in it)."""
    model_dir = Path(model_dir)
    return model_dir.parent / "exported" / f"{model_dir.name}{SUFFIXES[fmt]}"


class ExportedModel:
    """An exported file for inference: __call__(float32 (B, 3, S, S) 0..255) -> outputs, as
    {name: ndarray} for classify/segment, {"detections": [{key: ndarray}] * B} for detect."""

    def __init__(self, path: str | Path, task: str, fmt: str):
        self.path, self.task, self.fmt = Path(path), task, fmt
        self.contract = get_task(task)
        if fmt == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            self.names = [o.name for o in self.session.get_outputs()]
        else:
            import torchvision  # noqa: F401  registers torchvision::nms / roi_align, which detector files call

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
                self.module = torch.jit.load(str(self.path), map_location="cpu").eval()

    def __call__(self, images: np.ndarray) -> dict[str, Any]:
        if self.fmt == "onnx":
            return dict(zip(self.names, self.session.run(None, {INPUT_NAME: np.ascontiguousarray(images)})))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="RCNN always returns")  # torchvision, on every call
            return self.contract.outputs_to_numpy(self.module(torch.from_numpy(np.ascontiguousarray(images))))


def load_exported(path: str | Path, task: Optional[str] = None) -> ExportedModel:
    """An exported file, its task and format read from the sidecar (else the suffix and `task`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: exported model not found (write one with `visionflow export-model`)")
    side = sidecar_path(path)
    info = read_json(side) if side.is_file() else {}
    task = info.get("task", task)
    if task is None:
        raise UserError(f"{path}: no sidecar {side.name} to say which task the file is for")
    return ExportedModel(path, task, info.get("format", "onnx" if path.suffix == ".onnx" else "torchscript"))


# --- export --------------------------------------------------------------------------------

def _write_onnx(graph: nn.Module, example: Tensor, path: Path, task: str) -> None:
    names = list(get_task(task).export_outputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's warnings on torchvision internals are not ours
        program = torch.onnx.export(graph, (example,), input_names=[INPUT_NAME], output_names=names,
                                    dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1)}},
                                    dynamo=True, verbose=False)
    program.save(str(path), external_data=False)  # one self-contained file (protobuf limit: 2 GB)


def _write_torchscript(graph: nn.Module, example: Tensor, path: Path, task: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        torch.jit.script(graph).save(str(path))


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript}


def _self_check(graph: nn.Module, exported: ExportedModel, task: str, size: int) -> dict[str, Any]:
    """Run the exported file at batch 1 and 3 on synthetic images against the eager graph."""
    contract = get_task(task)
    diff, mismatched = 0.0, 0
    for seed, batch in enumerate(SELF_CHECK_BATCHES):
        x = _synthetic(batch, size, seed + 1)
        with torch.no_grad():
            ref = contract.outputs_to_numpy(graph(torch.from_numpy(x)))
        got = exported(x)
        n = len(next(iter(got.values())))  # first output: (B, ...) array or list of B
        if n != batch:
            raise ExportError(f"exported {exported.fmt} graph answered {n} results for a batch of {batch}")
        d, m = contract.output_diff(ref, got)
        diff, mismatched = max(diff, d), mismatched + m
    return {"inputs": f"synthetic noise images, batches of {' and '.join(map(str, SELF_CHECK_BATCHES))}",
            "reference": "the same graph run eagerly in PyTorch", "max_abs_diff": diff,
            **({"mismatched_images": mismatched} if contract.parity_counts_mismatches else {})}


def _versions(fmt: str) -> dict[str, str]:
    names = ["torch", "torchvision"] + (["onnx", "onnxscript", "onnxruntime"] if fmt == "onnx" else [])
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    import visionflow

    return {**out, "visionflow": visionflow.__version__}


def _opset(path: Path) -> Optional[int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _describe(meta: dict[str, Any], fmt: str, model_dir: Path, path: Path) -> dict[str, Any]:
    """The sidecar's fixed part: what the file is, its input contract and outputs."""
    task, size = meta["task"], int(meta["image_size"])
    contract = get_task(task)
    norm = contract.input_normalization(meta)
    resize = contract.input_resize(meta)
    fit = resize == "fit"  # a detector's batches: height and width vary (up to S), as preprocess pads them
    return {
        "format": fmt, "file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path),
        "task": task, "arch": meta.get("arch"), "classes": list(meta["classes"]),
        "num_classes": int(meta["num_classes"]), "image_size": size,
        "input": {"name": INPUT_NAME, "dtype": "float32",
                  "shape": ["batch", 3, "height", "width"] if fit else ["batch", 3, size, size],
                  "layout": "NCHW, RGB channel order", "range": "0..255 (uint8 pixel values as float)",
                  "resize_mode": resize, "resize": _resize_words(resize, size),
                  **norm, "dynamic_axes": {"0": "batch", **({"2": "height", "3": "width"} if fit else {})}},
        "outputs": [{"name": k, "meaning": v} for k, v in contract.export_outputs.items()],
        "opset": _opset(path) if fmt == "onnx" else None,
        "versions": _versions(fmt),
        "source": {"model_dir": str(model_dir), "model_sha256": file_digest(model_dir / MODEL_FILE)},
    }


def _resize_words(resize: str, size: int) -> str:
    if resize == "fit":
        return (f"fit: longest side bilinear to {size} (aspect ratio kept, cv2.INTER_LINEAR), top-left in a batch "
                f"as high and as wide as its largest image, the rest 0 (boxes are in those pixels; divide by "
                f"the image's scale to map them back)")
    if resize == "letterbox":
        return (f"letterbox: longest side bilinear to {size} (aspect ratio kept, cv2.INTER_LINEAR), centred on "
                f"a {size} x {size} canvas of 0 (outputs cover the padding; preprocess / the task map them back)")
    return f"bilinear to {size} x {size}, aspect ratio not kept (cv2.INTER_LINEAR)"


def write_export(predictor, model_dir: Path, fmt: str, out: Path,
            source: Optional[str] = None) -> tuple[dict[str, Any], ExportedModel]:
    """Write `out` and its sidecar; returns (sidecar + "path", the file loaded for inference)."""
    meta = predictor.meta
    task, size = meta["task"], int(meta["image_size"])
    graph = build_graph(predictor)
    example = torch.from_numpy(_synthetic(2, size))  # 2, not 1: torch.export specialises a size-1 axis
    with atomic_path(out) as tmp:
        try:
            with _WRITE_LOCK:
                _WRITERS[fmt](graph, example, tmp, task)
            exported = ExportedModel(tmp, task, fmt)  # loaded in memory: stays usable after the rename
            check = _self_check(graph, exported, task, size)
        except ExportError:
            raise
        except Exception as exc:  # the exporters and runtimes raise many types; all mean "no file"
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            other = [f for f in get_task(task).export_formats if f != fmt]
            hint = f"; try --format {other[0]}" if other else ""
            raise ExportError(f"{model_dir}: {fmt} export of {meta.get('arch')} failed "
                              f"({type(exc).__name__}: {first}){hint}") from exc
        info = _describe(meta, fmt, model_dir, tmp)
    info["file"] = out.name
    if source:
        info["source"]["model"] = source
    info["parity"] = {"self_check": check}
    write_json(sidecar_path(out), info)  # after the file: a sidecar never describes a file not there
    log.info("exported %s (%s) to %s, %d bytes, max |diff| %.3g", model_dir, fmt, out, info["bytes"],
             check["max_abs_diff"])
    exported.path = out
    return {**info, "path": str(out)}, exported


def export_model(model_dir: str | Path, fmt: str = "auto", out_path: str | Path | None = None) -> dict[str, Any]:
    """Export a model folder; returns the sidecar's contents plus "path".

    The file appears at `out_path` (default `default_export_path`) only complete and after it ran
    at batch 1 and 3 in the target runtime (onnxruntime / torch.jit.load)."""
    model_dir = Path(model_dir)
    predictor = load_model_folder(model_dir)
    fmt = resolve_format(predictor.meta["task"], fmt)
    out = Path(out_path) if out_path is not None else default_export_path(model_dir, fmt)
    check_suffix(out, fmt)
    return write_export(predictor, model_dir, fmt, out)[0]


def check_suffix(out: Path, fmt: str) -> None:
    other = {"onnx": (".pt", ".pth", ".ts", ".torchscript"), "torchscript": (".onnx",)}[fmt]
    if out.suffix.lower() in other:
        raise UserError(f"{out}: a {out.suffix} name for a {fmt} export; name it *{SUFFIXES[fmt]}")
