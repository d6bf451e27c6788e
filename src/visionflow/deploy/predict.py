"""Batch prediction: a classify, detect or segment model over a folder, a glob or a video.

The model is either a local model folder (paths.model_dir layout, loaded with
deploy.predictor.load_predictor, no MLflow) or an MLflow model URI (`models:/NAME@ALIAS`,
`models:/NAME/VERSION`, `runs:/RUN/model`) loaded as a pyfunc through visionflow.integrations.mlflow.
Either runs in onnxruntime instead when it carries an ONNX export whose parity was proven
(visionflow.deploy.runtime; `runtime` auto / torch / onnx; `BatchModel.runtime` says which and why).
All are wrapped as a `BatchModel`: RGB uint8 (H, W, 3) arrays in, one record out per image:

    classify  {"label", "name", "confidence"}
    detect    {"boxes" [[x1, y1, x2, y2]] absolute pixels, "labels", "names", "scores"} (+ "masks" [RLE])
    segment   {"mask": (H, W) uint8, 0 background, c + 1 for class c}

Outputs: classify CSV / JSON / JSONL rows; detect and segment a COCO results JSON (a list:
detections with bbox [x, y, w, h] and score, or per-class RLE masks for segment, with
`image_id` 1..N in input order plus the file name or video frame) or JSONL rows.

Images stream through in batches of `batch_size`, and records stream into the output
file, so memory stays flat however long the video. An unreadable image is skipped and
reported at the end; only a run in which nothing could be predicted is an error.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import numpy as np
from PIL import Image

from visionflow.core.errors import UserError
from visionflow.core.files import atomic_path, read_json
from visionflow.deploy.references import META_FILE, is_registry_uri, model_folder
from visionflow.manifest.images import load_rgb
from visionflow.tasks import task_of

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv"}
OUTPUT_FORMATS = (".csv", ".json", ".jsonl")
# Pillow reports bad files as any of these, depending on the codec (see manifest.images).
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class BatchModel(Protocol):
    task: str
    classes: list[str]
    meta: dict[str, Any]  # the model folder's meta.json (thresholds the summary names)
    contract: Any  # the task (visionflow.tasks): records, counts, output formats
    runtime: dict[str, Any]  # which runtime predicts and why (visionflow.deploy.runtime.Choice.info)

    def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]: ...


class _LocalModel:
    """A model folder through the Predictor (PyTorch) or its ONNX export (runtime.OnnxPredictor):
    no MLflow. `runtime` says which and why (runtime.Choice)."""

    def __init__(self, model_dir: Path, runtime: str = "auto", onnx: Optional[Path] = None,
                 meta: Optional[dict[str, Any]] = None, choice=None):
        from visionflow.core.files import read_json
        from visionflow.deploy.references import META_FILE
        from visionflow.deploy.runtime import ONNX, OnnxPredictor, choose_local

        meta = meta if meta is not None else read_json(model_dir / META_FILE)
        self.choice = choice or choose_local(model_dir, meta, runtime)
        if self.choice.name == ONNX:
            self.predictor = OnnxPredictor(onnx or self.choice.export.path, meta)
            self.choice.providers = self.predictor.providers
        else:
            from visionflow.deploy.predictor import load_predictor

            self.predictor = load_predictor(model_dir)
        self.meta = self.predictor.meta
        self.task, self.classes = task_of(self.meta), list(self.meta["classes"])
        self.contract = self.predictor.task
        self.runtime = self.choice.info()

    def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        return [self.contract.record(p) for p in self.predictor.predict(images, batch_size=max(1, len(images)))]


class _PyfuncModel:
    """A registered MLflow model: its input is the DataFrame column `image` (arrays accepted
    in process, see pyfunc_model), its output the task's columns (Task.pyfunc_columns)."""

    def __init__(self, pyfunc, choice):
        from visionflow.integrations import mlflow as tracking
        from visionflow.tasks import get_task

        self.pyfunc = pyfunc
        self.meta = meta = tracking.model_meta(pyfunc)
        self.task, self.classes = task_of(meta), list(meta.get("classes", []))
        self.contract = get_task(self.task)
        self.choice = choice
        self.runtime = choice.info()

    def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        import pandas as pd

        from visionflow.deploy.pyfunc import INPUT_COLUMN

        frame = self.pyfunc.predict(pd.DataFrame({INPUT_COLUMN: pd.Series(images, dtype=object)}))
        return [self.contract.from_frame_row(r) for r in frame.to_dict("records")]


def load_batch_model(spec: str, tracking_uri: Callable[[], str], runtime: str = "auto") -> BatchModel:
    """`spec`: an MLflow URI (models:/..., runs:/...) or a local model folder; `runtime` "auto",
    "torch" or "onnx" (visionflow.deploy.runtime: onnxruntime on a parity-proven ONNX export).

    `tracking_uri` is called only for an MLflow URI (resolving it may need params.yaml)."""
    from visionflow.deploy.runtime import ONNX, check_runtime, decide, registered_export

    check_runtime(runtime)
    if is_registry_uri(spec):
        from visionflow.integrations import mlflow as tracking

        uri = tracking_uri()
        if runtime == "torch":
            choice = decide(runtime, None, None)
        else:
            with tempfile.TemporaryDirectory(prefix="visionflow-runtime-") as tmp:
                model_dir, check = registered_export(spec, uri, Path(tmp))
                meta = read_json(model_dir / META_FILE) if model_dir else None
                choice = decide(runtime, task_of(meta) if meta else None, check)
                if choice.name == ONNX:  # the session holds the graph: the download can go
                    return _LocalModel(model_dir, runtime, meta=meta, choice=choice)
        return _PyfuncModel(tracking.load_model_checked(spec, uri), choice)
    return _LocalModel(model_folder(spec), runtime)


# --- inputs ---

@dataclass
class Item:
    """One input: the image (None when it could not be read) and the keys of its output row."""
    key: dict[str, Any]
    image: np.ndarray | None
    error: str | None = None


@dataclass
class Source:
    """Resolved `--images`: `items(fit)` yields Items lazily, image files read with load_rgb's
    `fit` (a model's predictor.reader_fit: JPEGs reduced as it was trained; None: in full);
    `total` sizes the progress bar."""
    kind: str  # "images" or "video"
    items: Callable[..., Iterator[Item]]
    total: int | None
    ignored: list[str] = field(default_factory=list)  # files that are not images (by extension)


def open_source(spec: str, every_nth_frame: int = 1) -> Source:
    """A folder (recursive), a glob, one image or one video file -> a Source."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
        return _video_source(path, every_nth_frame)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        files = [path]
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"{spec}: the pattern matches no files")
    else:
        raise UserError(f"{spec}: no such folder, file or pattern")
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    ignored = [str(p) for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if not images:
        raise UserError(f"{spec}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    return Source("images", lambda fit=None: (_read_image(p, fit) for p in images), len(images), ignored)


def _read_image(path: Path, fit=None) -> Item:
    try:
        return Item({"path": str(path)}, load_rgb(path, fit))
    except _READ_ERRORS as exc:
        return Item({"path": str(path)}, None, f"{exc.__class__.__name__}: {exc}")


def _video_source(path: Path, every_nth_frame: int) -> Source:
    import cv2

    if every_nth_frame < 1:
        raise UserError(f"--every-nth-frame must be >= 1, got {every_nth_frame}")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise UserError(f"{path}: not a readable video (OpenCV could not open it)")
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()

    def frames(fit=None) -> Iterator[Item]:  # decoded frames: no JPEG to reduce
        cap = cv2.VideoCapture(str(path))
        try:
            index = 0
            while True:
                if index % every_nth_frame:
                    ok = cap.grab()  # skip without decoding
                    if not ok:
                        break
                else:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    yield Item({"video": str(path), "frame": index}, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                index += 1
        finally:
            cap.release()

    total = -(-count // every_nth_frame) if count > 0 else None  # container counts are estimates
    return Source("video", frames, total)


# --- prediction and output ---

def predict_items(model: BatchModel, items: Iterator[Item], batch_size: int,
                  skipped: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """Records (the item's key + label, name, confidence), predicted `batch_size` at a time.

    Unreadable items are appended to `skipped` as (path, reason) and yield nothing."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    batch: list[Item] = []

    def flush() -> Iterator[dict[str, Any]]:
        preds = model.predict([it.image for it in batch])
        for it, pred in zip(batch, preds, strict=True):
            yield {**it.key, **pred}
        batch.clear()

    for item in items:
        if item.image is None:
            skipped.append((item.key.get("path", str(item.key)), item.error or "unreadable"))
            continue
        batch.append(item)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


class _Writer:
    """Streams records to an open text file as CSV, a JSON list or JSON lines."""

    def __init__(self, fh: io.TextIOBase, fmt: str, columns: list[str]):
        self.fh, self.fmt, self.n = fh, fmt, 0
        if fmt == ".csv":
            self.csv = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
            self.csv.writeheader()
        elif fmt == ".json":
            fh.write("[")

    def write(self, record: dict[str, Any]) -> None:
        if self.fmt == ".csv":
            self.csv.writerow(record)
        elif self.fmt == ".json":
            self.fh.write(("," if self.n else "") + "\n  " + json.dumps(record, ensure_ascii=False))
        else:
            self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.n += 1

    def close(self) -> None:
        if self.fmt == ".json":
            self.fh.write("\n]\n" if self.n else "]\n")


def check_output(out: Path | None, model: BatchModel | None = None) -> str | None:
    """The output format (".csv", ".json", ".jsonl") of `out`, None for no file."""
    fmt = out.suffix.lower() if out else None
    if out is not None and fmt not in OUTPUT_FORMATS:
        raise UserError(f"{out}: unknown output format {out.suffix!r} (use {', '.join(OUTPUT_FORMATS)})")
    if fmt == ".csv" and model is not None and not model.contract.writes_csv:
        raise UserError(f"{out}: a {model.task} model writes COCO results (.json) or JSON lines (.jsonl), not CSV")
    return fmt


def _where(key: dict[str, Any]) -> dict[str, Any]:
    """Which input a COCO results entry is about: the file, or the video and frame."""
    return {"file_name": key["path"]} if "path" in key else {"video": key["video"], "frame": key["frame"]}


def predict_to_file(model: BatchModel, source: Source, out: Path | None, batch_size: int = 32,
                    progress: bool = True, min_score: float = 0.5,
                    sink: Callable[[dict[str, Any], dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Predict every item of `source`; write the records to `out` (atomically) when given.

    `sink(key, record)` also receives every prediction (e.g. for a FiftyOne dataset).
    Returns {"task", "predicted" (images), "counts" (class name -> images (classify), detections
    scoring >= min_score (detect) or images showing the class (segment)), "objects" (what the
    records hold in all, whatever their score: detections, class regions, labels), "written"
    (entries in the file: rows, or COCO results entries), "hint" (why nothing was counted, if
    so), "skipped" [(path, reason)], "ignored" [path], "out"}. Raises UserError when not one
    image could be predicted (the previous `out` stays)."""
    from tqdm.auto import tqdm

    task, contract = model.task, model.contract
    fmt = check_output(out, model)
    key_columns = ["path"] if source.kind == "images" else ["video", "frame"]
    skipped: list[tuple[str, str]] = []
    counts: Counter[str] = Counter()
    predicted = objects = written = 0
    from visionflow.deploy.predictor import reader_fit

    bar = tqdm(source.items(reader_fit(model.meta)), total=source.total, unit="img" if source.kind == "images" else "frame",
               desc="predict", file=sys.stderr, disable=not progress or None)

    def consume(writer: _Writer | None) -> None:
        nonlocal predicted, objects, written
        for record in predict_items(model, iter(bar), batch_size, skipped):
            predicted += 1
            key = {k: record.pop(k) for k in key_columns}
            contract.count(record, counts, min_score, model.classes)
            objects += contract.objects(record)
            if sink:
                sink(key, record)
            if writer is None:
                continue
            if contract.writes_csv or fmt == ".jsonl":  # one row per image
                writer.write({**key, **contract.json_record(record)})
            else:  # COCO results
                for entry in contract.coco_entries(predicted, _where(key), record, model.classes):
                    writer.write(entry)
        if writer:
            writer.close()
            written = writer.n
        if not predicted:
            raise UserError(_nothing_predicted(skipped))

    try:
        if out is None:
            consume(None)
        else:
            with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
                consume(_Writer(fh, fmt, key_columns + list(contract.csv_columns)))
    finally:
        bar.close()
    rows = fmt is not None and (contract.writes_csv or fmt == ".jsonl")
    return {"task": task, "count_unit": contract.count_unit.format(min_score=min_score), "predicted": predicted,
            "counts": dict(sorted(counts.items())), "objects": objects, "object_unit": contract.object_unit,
            "written": written, "written_unit": "rows (one per image)" if rows else
            f"{contract.object_unit or 'entries'} (COCO results entries)",
            "hint": "" if sum(counts.values()) else contract.nothing_found(model.meta, min_score, objects),
            "skipped": skipped, "ignored": source.ignored, "out": str(out) if out else None,
            "runtime": getattr(model, "runtime", None)}


def _nothing_predicted(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return "no image to predict (the video has no readable frame)"
    shown = "; ".join(f"{p} ({why})" for p, why in skipped[:5])
    return f"no image could be predicted: all {len(skipped)} were unreadable: {shown}"


def format_report(result: dict[str, Any]) -> str:
    """The summary printed at the end: counts per class, then what was skipped or ignored."""
    counts = result["counts"]
    width = max([len("class"), *map(len, counts)])
    what = result.get("count_unit", "count")
    lines = [f"{'class':<{width}}  {what}", *(f"{name:<{width}}  {n:>5}" for name, n in counts.items()),
             f"{'total':<{width}}  {sum(counts.values()):>5}"]
    unit = result.get("object_unit")
    images = f"{result['predicted']} image{'s' if result['predicted'] != 1 else ''}"
    lines.append(f"predicted {images}" + (f": {result['objects']} {unit} in all" if unit else ""))
    if result["out"]:
        lines.append(f"wrote {result['written']} {result['written_unit']} for {images} to {result['out']}")
    if result.get("runtime"):
        lines.append(runtime_line(result["runtime"]))
    if result.get("hint"):
        lines.append(f"nothing counted: {result['hint']}")
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} unreadable image(s):")
        lines += [f"  {path}: {why}" for path, why in result["skipped"]]
    if result["ignored"]:
        lines.append(f"ignored {len(result['ignored'])} file(s) without an image extension:")
        lines += [f"  {path}" for path in result["ignored"]]
    return "\n".join(lines)


def runtime_line(runtime: dict[str, Any]) -> str:
    """`runtime: onnxruntime [CPUExecutionProvider] (why)`: which runtime predicted, and why."""
    providers = f" [{', '.join(runtime['providers'])}]" if runtime.get("providers") else ""
    return f"runtime: {runtime['name']}{providers} ({runtime['reason']})"
