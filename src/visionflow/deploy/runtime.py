"""Which runtime `predict` and `serve` run a model in: onnxruntime on the model's ONNX export
when the export's parity with PyTorch was proven on labelled test images, else PyTorch.

`--runtime auto` (the default) takes onnxruntime only for an export that
  - is ONNX (classify, segment, multilabel; detectors export to TorchScript only),
  - was made from this very model.pt (the sidecar's source.model_sha256), is the file its
    sidecar describes (sha256), and
  - passed the parity check on test samples (sidecar parity.samples.within_tolerance: what the
    promotion gate and `visionflow export-model` with a project's test split record);
and PyTorch otherwise, saying why. `--runtime onnx` insists: no usable ONNX export is an error
naming the command that makes one; an export only self-checked on synthetic images is used, and
said so. `--runtime torch` always runs PyTorch.

Where the export is: for a model folder models/<task>, `export.default_export_path`
(models/exported/<task>.onnx, with its sidecar <file>.json); for a registered version
(models:/NAME@ALIAS, models:/NAME/VERSION) the file its `export.uri` tag names (logged there by
the promotion gate or `visionflow export-model`).

The ONNX path is the parity check's own: `export.preprocess` then the task's
`exported_predictions`, so it predicts what the gate compared with PyTorch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from visionflow.core.errors import UserError
from visionflow.core.files import file_digest, read_json
from visionflow.deploy.references import MODEL_FILE

RUNTIMES = ("auto", "torch", "onnx")
ONNX, TORCH = "onnxruntime", "torch"


@dataclass
class ExportCheck:
    """What an ONNX export next to a model is worth: status "proven" (parity passed on test
    samples), "unproven" (self-check on synthetic images only), or not usable: "missing",
    "not_onnx", "stale", "failed"."""
    status: str
    reason: str
    path: Optional[Path] = None
    where: str = ""  # the file or artifact URI, for people
    parity: dict[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.status in ("proven", "unproven")


@dataclass
class Choice:
    """The runtime chosen and why: `info()` is what /metadata and the CLI summary say."""
    name: str  # ONNX or TORCH
    requested: str
    reason: str
    export: Optional[ExportCheck] = None
    providers: list[str] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "requested": self.requested, "reason": self.reason}
        if self.export is not None and self.export.where:
            out["export"] = self.export.where
        if self.providers:
            out["providers"] = self.providers
        return out


def check_runtime(requested: str) -> str:
    if requested not in RUNTIMES:
        raise UserError(f"unknown runtime {requested!r}; use one of {', '.join(RUNTIMES)}")
    return requested


def _parity_words(p: dict[str, Any], verb: str = "proven") -> str:
    return (f"parity {verb} on {p.get('n')} test images: max |diff| {p.get('max_abs_diff', float('nan')):.3g}, "
            f"{p.get('metric')} {p.get('metric_export', float('nan')):.4f} ONNX vs "
            f"{p.get('metric_torch', float('nan')):.4f} PyTorch")


def check_export(onnx_path: Path, model_dir: Path, where: str, how_to_export: str) -> ExportCheck:
    """The state of the ONNX file `onnx_path` (with its sidecar) as an export of `model_dir`."""
    from visionflow.deploy.export import sidecar_path

    if not onnx_path.is_file():
        return ExportCheck("missing", f"no ONNX export at {where} ({how_to_export})", where=where)
    side = sidecar_path(onnx_path)
    if not side.is_file():
        return ExportCheck("missing", f"{where} has no sidecar {side.name} saying what it is and how it was "
                                      f"checked ({how_to_export})", where=where)
    info = read_json(side)
    if info.get("format") != "onnx":
        return ExportCheck("not_onnx", f"{where} is a {info.get('format')} export, not ONNX", where=where)
    if info.get("sha256") and info["sha256"] != file_digest(onnx_path):
        return ExportCheck("stale", f"{where} is not the file its sidecar describes (sha256 differs); "
                                    f"{how_to_export}", where=where)
    made_from = (info.get("source") or {}).get("model_sha256")
    if made_from and made_from != file_digest(model_dir / MODEL_FILE):
        return ExportCheck("stale", f"{where} was exported from another {MODEL_FILE} than this model's "
                                    f"(retrained since?); {how_to_export}", where=where)
    parity = (info.get("parity") or {}).get("samples")
    if not parity:
        self_check = (info.get("parity") or {}).get("self_check") or {}
        return ExportCheck("unproven", f"{where}: parity checked on synthetic images only (max |diff| "
                                       f"{self_check.get('max_abs_diff', float('nan')):.3g}), not on test images",
                           onnx_path, where, self_check)
    if not parity.get("within_tolerance"):
        return ExportCheck("failed", f"{where}: its parity check FAILED ({_parity_words(parity, 'checked')}, "
                                     f"tolerance {parity.get('tolerance')})", onnx_path, where, parity)
    return ExportCheck("proven", f"{where}: {_parity_words(parity)}", onnx_path, where, parity)


def decide(requested: str, task: Optional[str], check: Optional[ExportCheck]) -> Choice:
    """The runtime for `requested` given the export's state (`task` None: not known yet, the
    export decides); UserError for --runtime onnx without a usable ONNX export."""
    from visionflow.tasks import get_task

    if requested == "torch":
        return Choice(TORCH, requested, "--runtime torch")
    if task is not None and "onnx" not in get_task(task).export_formats:
        formats = {"onnx": "ONNX", "torchscript": "TorchScript"}
        why = (f"{task} models export to {' or '.join(formats.get(f, f) for f in get_task(task).export_formats)} "
               f"only, not ONNX (onnxruntime runs classify, segment and multilabel models)")
        if requested == "onnx":
            raise UserError(f"--runtime onnx: {why}; use --runtime torch (or auto)")
        return Choice(TORCH, requested, f"auto: {why}")
    if check is None:
        raise ValueError("decide: no export state for a task that exports to ONNX")
    if check.status == "proven":
        return Choice(ONNX, requested, check.reason, check)
    if requested == "onnx":
        if check.status == "unproven":
            return Choice(ONNX, requested, f"--runtime onnx: {check.reason}", check)
        raise UserError(f"--runtime onnx: {check.reason}. Without a proven export use --runtime torch (or auto)")
    return Choice(TORCH, requested, f"auto: {check.reason}", check)


def local_export(model_dir: Path) -> ExportCheck:
    from visionflow.deploy.export import default_export_path

    path = default_export_path(model_dir, "onnx")
    how = (f"write one: visionflow export-model --model {model_dir} --out {path} --params params.yaml "
           f"(its parity is checked on the project's test split)")
    return check_export(path, model_dir, str(path), how)


def choose_local(model_dir: Path, meta: dict[str, Any], requested: str) -> Choice:
    """The runtime of a model folder; its ONNX export is looked for at export.default_export_path."""
    from visionflow.tasks import get_task, task_of

    check_runtime(requested)
    task = task_of(meta)
    check = None
    if requested != "torch" and "onnx" in get_task(task).export_formats:
        check = local_export(model_dir)
    return decide(requested, task, check)


# --- onnxruntime ------------------------------------------------------------------------------

def intra_op_threads() -> int:
    """onnxruntime's intra-op threads: torch's (OMP_NUM_THREADS when set, else the machine's
    cores), so both runtimes use the same share of the machine."""
    import torch

    return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0))))


def onnx_session(path: str | Path, device: str = "cpu", threads: Optional[int] = None):
    """An onnxruntime session: CUDAExecutionProvider first when `device` is cuda and the installed
    onnxruntime has it, else CPUExecutionProvider with `threads` (default intra_op_threads())
    intra-op threads, one inter-op thread, all graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or intra_op_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list[Any] = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(str(device).partition(":")[2] or 0)
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxPredictor:
    """An ONNX export as a predictor with ModelPredictor's face (meta, task, predict): the input
    through `export.preprocess`, the outputs through the task's `exported_predictions` (boxes
    and masks back at each image's own size), as the parity check does."""

    def __init__(self, path: str | Path, meta: dict[str, Any], device: str = "cpu", threads: Optional[int] = None):
        from visionflow.deploy.export import INPUT_NAME
        from visionflow.tasks import get_task, task_of

        self.path, self.meta = Path(path), meta
        self.task = get_task(task_of(meta))
        self.task.configure(meta)  # settings the train stage chose (multilabel: per-class thresholds)
        self.size = int(meta["image_size"])
        self.resize = self.task.input_resize(meta)  # stretch or letterbox, as the model was trained
        self.session = onnx_session(self.path, device, threads)
        self.input_name = INPUT_NAME
        self.names = [o.name for o in self.session.get_outputs()]
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None  # a file exported without a dynamic axis
        self.providers = list(self.session.get_providers())
        from visionflow.deploy.predictor import reader_fit

        self.fit = reader_fit(meta)  # JPEGs reduced as in training (train.decode), or None

    def read(self, path: str | Path) -> np.ndarray:
        """An image file as the model was trained on it (ModelPredictor.read)."""
        from visionflow.manifest.images import load_rgb

        return load_rgb(path, self.fit)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs for float32 (B, 3, S, S); a fixed-batch file runs in chunks of its
        batch size, the last one padded and the padding dropped."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            return dict(zip(self.names, self.session.run(None, {self.input_name: x})))
        n, b = len(x), self.fixed_batch
        parts: list[dict[str, np.ndarray]] = []
        for i in range(0, n, b):
            chunk = x[i:i + b]
            pad = b - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out = dict(zip(self.names, self.session.run(None, {self.input_name: chunk})))
            parts.append({k: v[:b - pad] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in self.names}

    def predict(self, images: list[np.ndarray], batch_size: int = 32) -> list[dict[str, Any]]:
        from visionflow.deploy.export import preprocess
        from visionflow.deploy.predictor import as_rgb

        out: list[dict[str, Any]] = []
        for i in range(0, len(images), batch_size):
            batch = [as_rgb(im) for im in images[i:i + batch_size]]
            outputs = self.run(preprocess(batch, self.size, self.resize))
            out += self.task.exported_predictions(outputs, [im.shape[:2] for im in batch], self.size, self.resize)
        classes = self.meta["classes"]
        for pred in out:  # names next to ids, as ModelPredictor.predict
            if "label" in pred:
                pred["name"] = classes[pred["label"]]
            if "labels" in pred:
                pred["names"] = [classes[k] for k in pred["labels"]]
        return out


# --- registered versions -------------------------------------------------------------------------

def registered_export(spec: str, uri: str, dst: Path) -> tuple[Optional[Path], ExportCheck]:
    """(the version's model folder, the state of its export) for models:/NAME@ALIAS or
    models:/NAME/VERSION: the file the version's export.uri tag names and its sidecar, downloaded
    under `dst` with the model folder (None when there is no ONNX export to check)."""
    from visionflow.integrations import mlflow as tracking

    how = (f"the promotion gate logs one to the version it checks (visionflow promote), or: visionflow "
           f"export-model --model {spec} --out FILE.onnx --params params.yaml")
    if not spec.startswith("models:/"):
        return None, ExportCheck("missing", f"{spec} is a run's model, which carries no export; name a "
                                            f"registered version (models:/NAME@ALIAS or models:/NAME/VERSION)")
    tags = tracking.version_tags(spec, uri)
    artifact = tags.get("export.uri")
    if not artifact:
        return None, ExportCheck("missing", f"{spec}: the version carries no export (no export.uri tag; {how})")
    if tags.get("export.format", "onnx") != "onnx":
        return None, ExportCheck("not_onnx", f"{spec}: its export {artifact} is {tags['export.format']}, not ONNX",
                                 where=artifact)
    model_dir = tracking.download_model_dir(spec, uri, dst / "model")
    onnx = tracking.download_artifact(artifact, uri, dst / "export")
    try:
        tracking.download_artifact(artifact + ".json", uri, dst / "export")
    except UserError:
        pass  # check_export says the sidecar is missing
    return model_dir, check_export(onnx, model_dir, artifact, how)
