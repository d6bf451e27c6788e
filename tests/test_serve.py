"""`visionflow serve` as a client meets it: a real server process on a loopback port, a real
tiny model (a resnet18 state_dict, meta.json, augment.json), real HTTP.

Predictions must equal the Predictor's; every hostile input (not an image, truncated, a
header claiming 100000x100000 pixels, a body over the limit, too many requests at once)
must get its 4xx/503 and never a 500, and the server must keep answering afterwards.
"""
from __future__ import annotations

import base64
import io
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import albumentations as A
import httpx
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from visionflow.core.files import write_json
from visionflow.deploy.predictor import load_predictor

CLASSES = ["circle", "square", "triangle"]
MAX_BODY = 1024 * 1024  # --max-body-mb 1
MAX_PIXELS = 1_000_000
TIMEOUT = httpx.Timeout(30.0)


def write_model_dir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=len(CLASSES)).state_dict(), folder / "model.pt")
    write_json(folder / "meta.json", {
        "task": "classify", "arch": "resnet18", "num_classes": len(CLASSES), "classes": CLASSES,
        "image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "params": {},
    })
    write_json(folder / "augment.json", A.to_dict(A.Compose([A.Resize(32, 32), A.Normalize()])))
    return folder


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR says width x height (CRC fixed, so the header is valid)."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8)))
    # signature (8) | length (4) | "IHDR" (4) | width, height (8) | 5 more bytes | CRC (4)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], cwd: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "visionflow.cli", "serve", *args, "--port", str(port)],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    stop_server(proc)
    pytest.fail(f"server did not start: {proc.stdout.read()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    proc, base = start_server(["--model", str(model_dir), "--max-body-mb", "1", "--max-pixels", str(MAX_PIXELS),
                               "--max-concurrency", "1"], cwd=model_dir.parent)
    yield base
    out = stop_server(proc)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # gone


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(48, 48, 3), (30, 40, 3), (64, 50, 3)]]


def _expected(model_dir: Path, blobs: list[bytes]) -> list[dict]:
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]  # plain RGB: no EXIF, no alpha
    return load_predictor(model_dir).predict(arrays)


def _assert_same(predictions: list[dict], expected: list[dict]) -> None:
    assert len(predictions) == len(expected)
    for got, exp in zip(predictions, expected):
        assert set(got) == {"label", "name", "confidence"}
        assert got["label"] == exp["label"] and got["name"] == exp["name"] == CLASSES[exp["label"]]
        assert got["confidence"] == pytest.approx(exp["confidence"], abs=1e-5)


def test_health_and_metadata(server):
    assert httpx.get(f"{server}/health", timeout=TIMEOUT).json() == {"status": "ok"}
    meta = httpx.get(f"{server}/metadata", timeout=TIMEOUT).json()
    assert meta["task"] == "classify" and meta["classes"] == CLASSES and meta["input_size"] == [32, 32]
    assert meta["decode"] == "full"  # its meta.json predates train.decode: trained on full decodes
    assert meta["limits"] == {"max_body_bytes": MAX_BODY, "max_pixels": MAX_PIXELS, "max_concurrency": 1}


def test_raw_json_and_multipart_predictions_equal_the_predictor(server, model_dir):
    arrays = _images()
    blobs = [encode(arrays[0]), encode(arrays[1]), encode(arrays[2], "JPEG")]
    expected = _expected(model_dir, blobs)

    r = httpx.post(f"{server}/predict", content=blobs[0], headers={"Content-Type": "image/png"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    _assert_same(r.json()["predictions"], expected[:1])
    r = httpx.post(f"{server}/predict", content=blobs[2], headers={"Content-Type": "image/jpeg"}, timeout=TIMEOUT)
    _assert_same(r.json()["predictions"], expected[2:])

    r = httpx.post(f"{server}/predict", json={"images": [base64.b64encode(b).decode() for b in blobs]},
                   timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    _assert_same(r.json()["predictions"], expected)
    r = httpx.post(f"{server}/predict", json={"image": base64.b64encode(blobs[1]).decode()}, timeout=TIMEOUT)
    _assert_same(r.json()["predictions"], expected[1:2])

    files = [("file", ("a.png", blobs[0], "image/png")), ("file", ("c.jpg", blobs[2], "image/jpeg"))]
    r = httpx.post(f"{server}/predict", files=files, data={"note": "ignored"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    _assert_same(r.json()["predictions"], [expected[0], expected[2]])


def test_uploads_are_read_as_predict_reads_files(server, model_dir, tmp_path):
    """An EXIF-rotated JPEG (a phone photo) and a PNG with transparency: the served prediction is
    `predict`'s for the same file (load_rgb: orientation applied, alpha composited over black),
    not that of Pillow's plain convert("RGB"), which the test checks differs. The MLflow pyfunc's
    decode gives load_rgb's pixels too."""
    from visionflow.deploy.pyfunc import decode_image
    from visionflow.manifest.images import load_rgb

    rng = np.random.default_rng(3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 50x30, shown 30x50
    rotated = tmp_path / "phone.jpg"
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(rotated, exif=exif, quality=95)
    rgba = np.dstack([rng.integers(0, 256, (40, 40, 3), dtype=np.uint8),
                      np.where(rng.random((40, 40)) < 0.5, 0, 255).astype(np.uint8)])
    transparent = tmp_path / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(transparent)
    predictor = load_predictor(model_dir)
    for path, ctype in ((rotated, "image/jpeg"), (transparent, "image/png")):
        pixels = load_rgb(path)
        np.testing.assert_array_equal(decode_image(path.read_bytes()), pixels)
        expected = predictor.predict([pixels])
        plain = predictor.predict([np.asarray(Image.open(path).convert("RGB"))])
        assert plain[0]["confidence"] != pytest.approx(expected[0]["confidence"], abs=1e-5), path.name
        r = httpx.post(f"{server}/predict", content=path.read_bytes(), headers={"Content-Type": ctype},
                       timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        _assert_same(r.json()["predictions"], expected)


def test_bad_input_gets_a_4xx_with_a_message_never_a_500(server):
    png = encode(_images()[0])
    cases = [
        (dict(content=b"hello, not an image", headers={"Content-Type": "image/png"}), 422, "not a PNG or JPEG"),
        (dict(content=png[: len(png) // 2], headers={"Content-Type": "image/png"}), 422, "truncated"),
        (dict(content=b"GIF89a" + b"\0" * 20, headers={"Content-Type": "image/png"}), 422, "not a PNG or JPEG"),
        (dict(json={"images": ["%%% not base64 %%%"]}), 400, "base64"),
        (dict(json={"images": [123]}), 400, "images[0]"),
        (dict(json={"images": []}), 400, "no image"),
        (dict(json={"picture": "x"}), 400, '{"image"'),
        (dict(content=b"{not json", headers={"Content-Type": "application/json"}), 400, "JSON"),
        (dict(content=png, headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
        (dict(content=b"--x\r\n\r\n", headers={"Content-Type": "multipart/form-data"}), 400, "boundary"),
    ]
    for kwargs, status, message in cases:
        r = httpx.post(f"{server}/predict", timeout=TIMEOUT, **kwargs)
        assert r.status_code == status, (kwargs.get("headers"), r.text)
        assert message in r.json()["detail"], r.text


def test_huge_dimensions_are_refused_from_the_header(server):
    for w, h in [(100_000, 100_000), (2000, 2000)]:
        r = httpx.post(f"{server}/predict", content=png_claiming(w, h), headers={"Content-Type": "image/png"},
                       timeout=TIMEOUT)
        assert r.status_code == 413, r.text
    # the budget is the request's: two 800x800 images (1.28 Mpx) are over 1 Mpx together
    big = encode(np.zeros((800, 800, 3), np.uint8))
    r = httpx.post(f"{server}/predict", json={"images": [base64.b64encode(big).decode()] * 2}, timeout=TIMEOUT)
    assert r.status_code == 413 and "exceed 1000000 pixels" in r.json()["detail"]
    assert httpx.post(f"{server}/predict", content=big, headers={"Content-Type": "image/png"},
                      timeout=TIMEOUT).status_code == 200


def _raw_request(base: str, head: str, body_chunks=()) -> tuple[bytes, float]:
    """Send `head` (and then chunks, stopping when the server closes), return the response and
    the seconds it took to come."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        start = time.monotonic()
        s.sendall(head.encode("latin-1"))
        for chunk in body_chunks:
            try:
                s.sendall(chunk)
            except OSError:  # the server answered and closed while we were still sending
                break
        response = b""
        try:
            while b"\r\n\r\n" not in response:
                data = s.recv(65536)
                if not data:
                    break
                response += data
        except ConnectionResetError:
            pass
        return response, time.monotonic() - start


def test_oversize_bodies_get_413_before_being_read(server):
    # Content-Length over the limit and no body at all: an answer that comes means the
    # server did not wait for (let alone spool) the 50 MB.
    head = ("POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {50 * MAX_BODY}\r\n\r\n")
    response, seconds = _raw_request(server, head)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert seconds < 5

    # chunked (no Content-Length): counted while it streams; 2 MB offered, refused past 1 MB
    chunk = b"\0" * 65536
    chunks = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(32)] + [b"0\r\n\r\n"]
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    response, _ = _raw_request(server, head, chunks)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert httpx.get(f"{server}/health", timeout=TIMEOUT).status_code == 200


def test_over_the_concurrency_limit_gets_a_fast_503_and_health_stays_up(server):
    # 300 solid 32x32 images keep the one inference slot busy for a while
    tiny = base64.b64encode(encode(np.full((32, 32, 3), 90, np.uint8))).decode()
    payload = json.dumps({"images": [tiny] * 300}).encode()
    results: list[tuple[int, str | None, float]] = []
    barrier = threading.Barrier(8)

    def fire():
        barrier.wait(timeout=10)
        start = time.monotonic()
        r = httpx.post(f"{server}/predict", content=payload, headers={"Content-Type": "application/json"},
                       timeout=TIMEOUT)
        results.append((r.status_code, r.headers.get("retry-after"), time.monotonic() - start))

    threads = [threading.Thread(target=fire) for _ in range(8)]
    for t in threads:
        t.start()
    health = []
    for _ in range(5):  # the event loop answers while inference runs in the pool
        start = time.monotonic()
        health.append((httpx.get(f"{server}/health", timeout=TIMEOUT).status_code, time.monotonic() - start))
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=60)
    statuses = [s for s, _, _ in results]
    assert len(statuses) == 8 and set(statuses) <= {200, 503}, results
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, results
    assert all(retry == "1" for s, retry, _ in results if s == 503)
    assert max(sec for s, _, sec in results if s == 503) < 2  # refused at once, not queued
    assert all(code == 200 for code, _ in health) and max(sec for _, sec in health) < 2, health


def test_not_a_model_folder_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "visionflow.cli", "serve", "--model", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert str(tmp_path) in out.stderr and "model.pt" in out.stderr and "Traceback" not in out.stderr


def test_registered_model_is_served_by_alias(tmp_path):
    """models:/NAME@ALIAS on a temporary sqlite store, served by uvicorn in a thread of this
    process (mlflow is already imported here, which saves a second slow start-up)."""
    import uvicorn

    sys.path.insert(0, str(Path(__file__).parent))
    from test_register import make_project  # a plain function: the project register needs

    from visionflow.core.config import RegisterParams
    from visionflow.deploy.serve import Limits, build_app, load_served_model
    from visionflow.stages.register import register

    paths = make_project(tmp_path / "project")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = register(RegisterParams(tracking_uri=uri, model_name="served"), paths)
    model = load_served_model("models:/served@candidate", uri)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(model, Limits()), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        meta = httpx.get(f"{base}/metadata", timeout=TIMEOUT).json()
        assert {k: meta[k] for k in ("model_name", "version", "alias", "run_id")} == {
            "model_name": "served", "version": result["version"], "alias": "candidate", "run_id": result["run_id"]}
        assert meta["classes"] == CLASSES and meta["input_size"] == [32, 32]
        blobs = [encode(a) for a in _images()]
        r = httpx.post(f"{base}/predict", json={"images": [base64.b64encode(b).decode() for b in blobs]},
                       timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        _assert_same(r.json()["predictions"], _expected(paths.model_dir, blobs))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()
