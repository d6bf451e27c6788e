"""A hardened REST service for one classify, detect or segment model (`visionflow serve`).

Endpoints:
    POST /predict   one image as the raw body (Content-Type image/png or image/jpeg), one or
                    more files as multipart/form-data, or JSON {"image": b64} / {"images": [b64, ...]}
                    -> {"predictions": [...]} in input order, one per image:
                       classify {"label", "name", "confidence"}
                       detect   {"boxes" [[x1, y1, x2, y2]] pixels, "labels", "names", "scores"
                                 (+ "masks" [COCO RLE] for Mask R-CNN)}
                       segment  {"mask_png" (base64 PNG of class values, 0 background, c + 1
                                 for class c), "classes_present", "height", "width"}
    GET  /health    -> {"status": "ok"}
    GET  /metadata  -> model name/version/alias (registry models), task, classes, input size,
                       runtime {"name": "onnxruntime" or "torch", "requested", "reason", "export",
                       "providers"} (visionflow.deploy.runtime)

Limits, all enforced before work is done: the body size (413, checked on Content-Length and
counted while a chunked body streams, in an ASGI middleware so nothing over the limit is
spooled), the pixels of the request's images read from their headers before decoding (413),
and the number of /predict requests in flight (a fast 503 with Retry-After, no queueing).
Not an image, a corrupt or truncated one, or a malformed request -> 4xx with a message.
python-multipart is not a dependency: multipart bodies are parsed here (the body is already
in memory and bounded by the size limit).
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request)
# at run time, and Request is imported inside build_app.
import asyncio
import base64
import binascii
import io
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from visionflow.core.service import sigterm_as_ctrl_c, warn_if_exposed

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("PNG", "JPEG")  # what PIL may open: no EPS (ghostscript), TIFF, ... from the network
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")
BODY_READ_TIMEOUT_S = 30.0  # a slow upload must not hold a concurrency slot for ever
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000  # summed over the images of one request
    max_concurrency: int = 4


class RequestError(Exception):
    """A client error: `status` and a message for the response."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServedModel:
    """What the app needs: predict(list of RGB uint8 (H, W, 3)) -> [{"label", "name", "confidence"}]."""
    predict: Callable[[list[np.ndarray]], list[dict[str, Any]]]
    metadata: dict[str, Any]
    fit: Optional[Callable[[int, int], tuple[int, int]]] = None  # JPEGs reduced as trained (predictor.reader_fit)


# --- loading ---

def load_served_model(model: str, tracking_uri: str | None = None, runtime: str = "auto") -> ServedModel:
    """`models:/NAME@ALIAS` (or models:/NAME/VERSION) from the registry at `tracking_uri`,
    else a local model folder (models/classify/). Loading is batch prediction's
    (`predict.load_batch_model`, `runtime` auto / torch / onnx: visionflow.deploy.runtime);
    serving adds what /metadata reports, the runtime and why among it."""
    from visionflow.core.errors import UserError
    from visionflow.deploy.predict import load_batch_model

    registered = model.startswith("models:/")
    if registered and not tracking_uri:
        raise UserError(f"{model}: no tracking URI (set register.tracking_uri in params.yaml, "
                        "$MLFLOW_TRACKING_URI or --tracking-uri)")
    from visionflow.deploy.predictor import reader_fit

    loaded = load_batch_model(model, lambda: tracking_uri, runtime)
    fit = reader_fit(loaded.meta)

    def predict(images: list[np.ndarray]) -> list[dict[str, Any]]:
        return [loaded.contract.served_record(r) for r in loaded.predict(images)]

    if not registered:
        from pathlib import Path

        return ServedModel(predict, {"source": str(Path(model).resolve()), **_meta_fields(loaded.meta),
                                     "runtime": loaded.runtime}, fit)
    from visionflow.integrations import mlflow as tracking

    try:
        info = tracking.describe_model_uri(model, tracking_uri)
    except Exception as exc:  # MLflow's own exception types; the model did load, so say what failed
        raise UserError(f"{model}: loaded, but its registry entry cannot be read from {tracking_uri}: "
                        f"{exc}") from None
    return ServedModel(predict, {**info, "model_uri": model, **_meta_fields(loaded.meta), "runtime": loaded.runtime},
                       fit)


def _meta_fields(meta: dict[str, Any]) -> dict[str, Any]:
    from visionflow.deploy.predictor import decode_of

    size = meta.get("image_size")
    return {"task": meta.get("task"), "arch": meta.get("arch"), "classes": list(meta.get("classes", [])),
            "num_classes": meta.get("num_classes"), "input_size": [size, size] if size else None,
            "decode": decode_of(meta) if meta.get("task") else None}


# --- request parsing (pure functions; RequestError for the client's mistakes) ---

def read_images(body: bytes, content_type: str) -> list[bytes]:
    """The encoded images of one /predict body, by its Content-Type."""
    mime = content_type.split(";")[0].strip().lower()
    if mime in IMAGE_TYPES:
        images = [body]
    elif mime == "application/json":
        images = _json_images(body)
    elif mime == "multipart/form-data":
        images = _multipart_files(body, content_type)
    else:
        raise RequestError(415, f"unsupported Content-Type {mime or '(none)'!r}: send image/png, image/jpeg, "
                                "multipart/form-data or application/json")
    if not images:
        raise RequestError(400, "the request holds no image")
    return images


def _json_images(body: bytes) -> list[bytes]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("image"), str):
        cells = [doc["image"]]
    elif isinstance(doc, dict) and isinstance(doc.get("images"), list):
        cells = doc["images"]
    else:
        raise RequestError(400, 'JSON body must be {"image": "<base64>"} or {"images": ["<base64>", ...]}')
    out = []
    for i, cell in enumerate(cells):
        if not isinstance(cell, str):
            raise RequestError(400, f"images[{i}]: expected base64 text, got {type(cell).__name__}")
        try:
            out.append(base64.b64decode(cell, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f"images[{i}]: not valid base64: {exc}") from None
    return out


def _multipart_files(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a multipart/form-data body that carry a file (a filename or an image type)."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise RequestError(400, "multipart/form-data without a boundary")
    delimiter = b"--" + m.group(1).encode("latin-1")
    files = []
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            raise RequestError(400, "malformed multipart body (a part without headers)")
        headers = head.decode("latin-1").lower()
        if "filename=" in headers or "content-type: image/" in headers:
            files.append(content[:-2] if content.endswith(b"\r\n") else content)
    return files


def decode_images(blobs: list[bytes], max_pixels: int, fit=None) -> list[np.ndarray]:
    """Encoded PNG/JPEG -> RGB uint8 (H, W, 3), as `predict` reads files. Sizes come from the
    headers (Image.open does not decode), so a request over `max_pixels` in total is refused
    before any pixel is. `fit`: JPEGs reduced as the model was trained (ServedModel.fit)."""
    opened, total = [], 0
    try:
        for i, blob in enumerate(blobs):
            im = _open(blob, i)
            opened.append(im)
            total += im.width * im.height
            if total > max_pixels:
                raise RequestError(413, f"image {i} is {im.width}x{im.height}: the request's images exceed "
                                        f"{max_pixels} pixels in total")
        return [_decode(im, blob, i, fit) for i, (im, blob) in enumerate(zip(opened, blobs))]
    finally:
        for im in opened:
            im.close()


def _open(blob: bytes, i: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # PIL's own guard, past 2 * MAX_IMAGE_PIXELS
        raise RequestError(413, f"image {i}: {exc}") from None
    except Image.UnidentifiedImageError:
        raise RequestError(422, f"image {i}: not a PNG or JPEG image ({len(blob)} bytes)") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's plugins raise SyntaxError on bad headers
        raise RequestError(422, f"image {i}: corrupt image header: {exc}") from None


def _decode(im: Image.Image, blob: bytes, i: int, fit=None) -> np.ndarray:
    """As `predict` and training read a file (manifest.images.image_rgb): EXIF orientation
    applied, transparency composited over black, 16-bit scaled."""
    from visionflow.manifest.images import image_rgb

    try:
        return image_rgb(im, lambda: np.frombuffer(blob, dtype=np.uint8), fit)
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"image {i}: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise RequestError(422, f"image {i}: corrupt or truncated {im.format} image: {exc}") from None


# --- the ASGI app ---

def _json_response(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status, headers=headers)


class PredictGuard:
    """ASGI middleware in front of POST /predict: the concurrency gate (fast 503, before the
    body is read) and the body size limit (413 on Content-Length, or as soon as a streamed
    body passes it). The body is read here, bounded, and replayed to the app."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits
        self.in_flight = 0  # touched only on the event loop thread: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limits.max_concurrency:
            return await _json_response(503, {"detail": f"busy: {self.limits.max_concurrency} requests in "
                                                         "flight; retry later"},
                                        {"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send)
        self.in_flight += 1
        try:
            try:
                body = await self._read_body(scope, receive)
            except RequestError as exc:
                # Connection: close, since the rest of the body is left unread.
                return await _json_response(exc.status, {"detail": str(exc)},
                                            {"Connection": "close"})(scope, receive, send)
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: waits for http.disconnect

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.limits.max_body_bytes
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, "invalid Content-Length")
            if int(declared) > limit:
                raise RequestError(413, f"body of {int(declared)} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_READ_TIMEOUT_S
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                raise RequestError(408, f"body not received within {BODY_READ_TIMEOUT_S:.0f} s") from None
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def build_app(model: ServedModel, limits: Limits):
    """The FastAPI app wrapped in PredictGuard. Inference runs in a pool of
    `max_concurrency` threads, so the event loop keeps answering /health."""
    from fastapi import FastAPI, Request

    pool = ThreadPoolExecutor(max_workers=limits.max_concurrency, thread_name_prefix="predict")
    app = FastAPI(title="visionflow model server", docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata():
        return {**model.metadata, "limits": {"max_body_bytes": limits.max_body_bytes,
                                             "max_pixels": limits.max_pixels,
                                             "max_concurrency": limits.max_concurrency}}

    @app.post("/predict")
    async def predict(request: Request):
        body = await request.body()
        loop = asyncio.get_running_loop()
        try:
            blobs = read_images(body, request.headers.get("content-type", ""))
            # Decoding is CPU work too: off the event loop, with the model.
            images = await loop.run_in_executor(pool, decode_images, blobs, limits.max_pixels, model.fit)
        except RequestError as exc:
            return _json_response(exc.status, {"detail": str(exc)})
        predictions = await loop.run_in_executor(pool, model.predict, images)
        return {"predictions": predictions}

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # a bug of ours: log it, never send a traceback
        log.exception("error serving %s", request.url.path)
        return _json_response(500, {"detail": "internal error"})

    app.router.on_shutdown.append(lambda: pool.shutdown(wait=False, cancel_futures=True))
    return PredictGuard(app, limits)


def serve(model: ServedModel, limits: Limits, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Run the server until Ctrl-C / SIGTERM (uvicorn stops gracefully on both)."""
    import uvicorn

    warn_if_exposed(host, "the model server")
    config = uvicorn.Config(build_app(model, limits), host=host, port=port, log_level="info",
                            timeout_keep_alive=5, server_header=False)
    print(f"serving {model.metadata.get('model_uri') or model.metadata.get('source')} at http://{host}:{port} "
          "(POST /predict, GET /health, GET /metadata; Ctrl-C to stop)", flush=True)
    if model.metadata.get("runtime"):
        from visionflow.deploy.predict import runtime_line

        print(runtime_line(model.metadata["runtime"]), flush=True)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
    # handler it found: make SIGTERM, like Ctrl-C, end in KeyboardInterrupt and exit 0.
    try:
        with sigterm_as_ctrl_c():
            server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 1
