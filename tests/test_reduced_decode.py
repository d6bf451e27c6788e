"""train.decode: reduced. Classify and multilabel decode a JPEG at 1/2, 1/4 or 1/8 of its size
inside libjpeg's IDCT wherever that is still at least the model input's size, and every reader of
the model (training, evaluate, predict, serve, the pyfunc, the promotion gate) decodes as training
did. The photos are real ones (tests/data/real/labelimg-yolo: 1280x720, 800x800, 1000x666)."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
from PIL import Image

from visionflow.core.config import ConfigError, TrainParams, load_params
from visionflow.deploy import pyfunc, serve
from visionflow.deploy.predict import open_source
from visionflow.deploy.predictor import decode_of, load_predictor, reader_fit
from visionflow.manifest import Category, Sample
from visionflow.manifest import images
from visionflow.manifest.images import jpeg_reduction, load_rgb, sha256_file
from visionflow.tasks import get_task
from visionflow.training.augment import DecodeFit, decode_fit, resize_steps

from project import write_model_folder

REAL = Path(__file__).parent / "data" / "real" / "labelimg-yolo"
PHOTOS = [REAL / "crack.jpeg", REAL / "strawberry.jpg", REAL / "birds.jpg"]  # 1280x720, 800x800, 1000x666


def _fit(size: int, resize: str = "stretch") -> DecodeFit:
    return decode_fit(resize_steps(size, resize), "reduced")


def _pillow_only(monkeypatch) -> None:
    monkeypatch.setattr(images, "_decode_rgb_jpeg", lambda *a: None)


def _rotated_jpeg(path: Path, orientation: int, progressive: bool = False) -> Path:
    """crack.jpeg's pixels saved again with an EXIF orientation tag (shown turned)."""
    with Image.open(REAL / "crack.jpeg") as im:
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(path, exif=exif, quality=92, progressive=progressive)
    return path


@pytest.mark.parametrize("size", [64, 96, 160, 300])
def test_reduced_decodes_are_pillows_draft_bit_for_bit(tmp_path, monkeypatch, size):
    files = [*PHOTOS, _rotated_jpeg(tmp_path / "rot6.jpg", 6), _rotated_jpeg(tmp_path / "rot3p.jpg", 3, True)]
    fit = _fit(size)
    fast = [load_rgb(p, fit) for p in files]
    _pillow_only(monkeypatch)
    slow = [load_rgb(p, fit) for p in files]
    for p, a, b in zip(files, fast, slow):
        assert a.shape == b.shape and a.dtype == np.uint8, p.name
        np.testing.assert_array_equal(a, b, err_msg=p.name)
        assert min(a.shape[:2]) >= size  # stretch: both sides at least the input's
    assert fast[0].shape[:2] < load_rgb(files[0]).shape[:2]  # and reduced it was


@pytest.mark.parametrize("width,height,size,resize,factor", [
    (1280, 720, 224, "stretch", 2),    # 720 / 2 = 360 >= 224; 720 / 4 = 180 < 224
    (1280, 720, 90, "stretch", 8),     # 720 / 8 = 90: exactly enough
    (1280, 720, 91, "stretch", 4),
    (1280, 720, 640, "stretch", 1),    # 720 / 2 = 360 < 640: in full
    (1280, 720, 160, "letterbox", 8),  # longest side 1280 -> 160 (cols 160, rows 90): 1/8 is 160 x 90
    (4032, 3024, 224, "stretch", 8),   # a phone photo: 504 x 378
    (1001, 751, 250, "stretch", 2),    # odd sides: ceil(751 / 2) = 376 >= 250; ceil(751 / 4) = 188 < 250
])
def test_the_factor_is_the_largest_that_keeps_the_input_size(tmp_path, width, height, size, resize, factor):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)
    fit = _fit(size, resize)
    with Image.open(path) as im:
        assert jpeg_reduction(im, 1, fit) == factor
    image = load_rgb(path, fit)
    assert image.shape == (-(-height // factor), -(-width // factor), 3)
    rows, cols = fit(height, width)
    assert image.shape[0] >= rows and image.shape[1] >= cols
    if factor < 8:  # the next factor would go below the input's size
        f = factor * 2
        assert -(-height // f) < rows or -(-width // f) < cols


def test_exif_turned_photos_reduce_by_their_displayed_sides(tmp_path):
    path = _rotated_jpeg(tmp_path / "rot6.jpg", 6)  # stored 1280x720, shown 720 wide and 1280 high
    letterbox = _fit(160, "letterbox")  # shown: rows 160, cols 90
    assert load_rgb(path).shape == (1280, 720, 3)
    assert load_rgb(path, letterbox).shape == (160, 90, 3)
    upright = _rotated_jpeg(tmp_path / "rot1.jpg", 1)  # the same encoded pixels, shown as stored
    np.testing.assert_array_equal(load_rgb(path, letterbox), np.rot90(load_rgb(upright, _fit(90)), -1))


def test_other_formats_and_no_fit_decode_in_full(tmp_path):
    rgb = load_rgb(PHOTOS[0])
    Image.fromarray(rgb).save(tmp_path / "same.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "same.png", _fit(64)), rgb)
    np.testing.assert_array_equal(load_rgb(PHOTOS[0], None), rgb)
    assert decode_fit(resize_steps(64, "stretch"), "full") is None
    assert decode_fit([A.HorizontalFlip()], "reduced") is None  # no leading resize: nothing to fit
    with pytest.raises(Exception, match="train.decode"):
        decode_fit(resize_steps(64), "half")


def test_greyscale_jpegs_reduce_through_pillow(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.open(PHOTOS[0]).convert("L").save(path, quality=90)
    image = load_rgb(path, _fit(90))
    assert image.shape == (90, 160, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_reduced_pixels_are_closer_to_an_area_downscale_than_a_full_decode_resized(tmp_path):
    """The scaled IDCT averages each block, so the model input is a proper downscale; a full decode
    bilinearly resized by more than 2x skips pixels (aliasing). Measured on the real photos against
    OpenCV's INTER_AREA of the full decode: 2-3x closer at 96 and 224 px."""
    for path in PHOTOS:
        full = load_rgb(path)
        for size in (96, 224):
            resize = A.Compose(resize_steps(size, "stretch"))
            reference = cv2.resize(full, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64)
            reduced_in = resize(image=load_rgb(path, _fit(size)))["image"].astype(np.float64)
            full_in = resize(image=full)["image"].astype(np.float64)
            err_reduced, err_full = np.abs(reduced_in - reference).mean(), np.abs(full_in - reference).mean()
            assert err_reduced < 0.7 * err_full, (path.name, size, err_reduced, err_full)


# --- every reader of a model decodes as its training did ------------------------------------------

def _model_dir(root: Path, task: str, params: TrainParams, drop_decode: bool = False) -> Path:
    # drop_decode: meta.json as visionflow wrote it before train.decode existed
    return write_model_folder(root, task, params, drop=("decode",) if drop_decode else ())


def _params(decode: str = "reduced", **kw) -> TrainParams:
    return TrainParams(image_size=64, decode=decode, model={"arch": "small_cnn", "weights": None}, **kw)


def _samples(paths: list[Path]) -> list[Sample]:
    out = []
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            w, h = im.size
        out.append(Sample(id=p.stem, root=str(p.parent), path=p.name, width=w, height=h, sha256=sha256_file(p),
                          labels=[i % 2]))
    return out


@pytest.mark.parametrize("task", ["classify", "multilabel"])
def test_training_records_and_every_reader_see_the_same_pixels(tmp_path, task):
    params = _params()
    contract = get_task(task, params)
    train_tf, eval_tf = contract.build_transforms(params)
    samples = _samples(PHOTOS)
    train_ds = contract.build_dataset(samples, train_tf, REAL)
    val_ds = contract.build_dataset(samples, eval_tf, REAL)
    predictor = load_predictor(_model_dir(tmp_path / "model", task, params))
    assert decode_of(predictor.meta) == "reduced" and predictor.fit is not None
    pickle.loads(pickle.dumps(train_ds.fit))  # travels to spawned loader workers
    source = open_source(str(REAL / "*.jp*g"))
    read_by_predict = {Path(item.key["path"]).name: item.image for item in source.items(reader_fit(predictor.meta))}
    for i, path in enumerate(PHOTOS):
        expected = predictor.read(path)
        assert expected.shape[:2] < load_rgb(path).shape[:2]  # reduced: 64 px from 666-800 px sides
        for ds in (train_ds, val_ds):  # the training record is the decode through the resize
            np.testing.assert_array_equal(ds.raw(i)["image"], expected)
            np.testing.assert_array_equal(ds.record(i)["image"],
                                          A.Compose(resize_steps(64, "stretch"))(image=expected)["image"])
        np.testing.assert_array_equal(read_by_predict[path.name], expected)  # visionflow predict
        blob = path.read_bytes()
        np.testing.assert_array_equal(serve.decode_images([blob], 10**8, reader_fit(predictor.meta))[0], expected)
        np.testing.assert_array_equal(pyfunc.decode_image(blob, predictor.fit), expected)  # the MLflow model
    # and the predictions the model makes on those pixels are the ones `score` (evaluate, the gate) scores
    seen: list = []
    predictor.score(samples, REAL, [Category(0, "a"), Category(1, "b")],
                    each=lambda chunk, imgs, ps: seen.extend(imgs))
    for image, path in zip(seen, PHOTOS):
        np.testing.assert_array_equal(image, predictor.read(path))


def test_full_decode_legacy_models_and_pixel_tasks_read_every_pixel(tmp_path):
    full = load_rgb(PHOTOS[0])
    for name, task, params, drop in (("full", "classify", _params("full"), False),
                                     ("legacy", "classify", _params(), True),  # trained before train.decode
                                     ("detect", "detect", TrainParams(image_size=64, resize="letterbox",
                                                                     model={"arch": "fasterrcnn_mobilenet_v3_large_fpn",
                                                                            "weights": None}), False)):
        predictor = load_predictor(_model_dir(tmp_path / name, task, params, drop_decode=drop))
        assert predictor.fit is None and decode_of(predictor.meta) == "full", name
        np.testing.assert_array_equal(predictor.read(PHOTOS[0]), full)
    contract = get_task("classify", _params("full"))
    ds = contract.build_dataset(_samples(PHOTOS[:1]), contract.build_transforms(_params("full"))[1], REAL)
    assert ds.fit is None
    np.testing.assert_array_equal(ds.raw(0)["image"], full)
    detect = get_task("detect", TrainParams(image_size=64))  # default decode: reduced; detect still full
    assert detect.decode_mode == "full"


def test_the_disk_cache_keeps_reduced_and_full_records_apart(tmp_path):
    keys = []
    for decode in ("reduced", "full"):
        contract = get_task("classify", _params(decode))
        ds = contract.build_dataset(_samples(PHOTOS[:1]), contract.build_transforms(_params(decode))[1], REAL)
        ds.use_cache("disk", tmp_path)
        keys.append(ds._disk_path(0))
        ds.record(0)
        np.testing.assert_array_equal(np.load(keys[-1]), ds.make_record(0)["image"])
    assert keys[0] != keys[1]


def test_detect_and_segment_refuse_an_explicit_reduced_decode(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    text = text.replace("decode: full               # detect/segment", "decode: reduced            # detect/segment", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"detect.train.decode: reduced is for classify and multilabel"):
        load_params(tmp_path / "params.yaml")


def test_predict_cli_reads_as_trained_and_serve_says_how(tmp_path):
    """`visionflow predict` on the photos gives the predictions of the reduced pixels (a model whose
    answer differs between the reduced and the full decode shows which one the CLI used), and
    /metadata's model fields say decode: reduced."""
    params = _params()
    model_dir = _model_dir(tmp_path / "model", "classify", params)
    predictor = load_predictor(model_dir)
    reduced = predictor.predict([predictor.read(p) for p in PHOTOS])
    full = predictor.predict([load_rgb(p) for p in PHOTOS])
    out = tmp_path / "preds.jsonl"
    run = subprocess.run([sys.executable, "-m", "visionflow.cli", "predict", "--model", str(model_dir),
                          "--images", str(REAL / "*.jp*g"), "--out", str(out), "--runtime", "torch"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    apart = [abs(r["confidence"] - f["confidence"]) > 1e-4 for r, f in zip(reduced, full)]
    assert sum(apart) >= 2  # the model tells the two decodes apart
    for p, r, f, differs in zip(PHOTOS, reduced, full, apart):
        assert rows[p.name]["confidence"] == pytest.approx(r["confidence"], abs=1e-5)
        if differs:
            assert rows[p.name]["confidence"] != pytest.approx(f["confidence"], abs=1e-5)
    assert serve._meta_fields(predictor.meta)["decode"] == "reduced"
    assert serve._meta_fields({**predictor.meta, "params": {}})["decode"] == "full"
