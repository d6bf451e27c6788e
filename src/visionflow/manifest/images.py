"""Image files: probing (size, content hash, integrity) and the one RGB loader training uses.

Sizes are always reported AFTER EXIF orientation, the way `ImageOps.exif_transpose` shows the
image: orientations 5-8 rotate by 90 degrees, so width and height swap. Annotations are in
that displayed frame, so the manifest's width/height must be too. One orientation policy for
pixels and annotations: `load_rgb` transposes the pixels; a reader whose annotations were
drawn on the RAW (stored) frame maps them with `raw_to_displayed` (see `exif_orientation`).

Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) stays on everywhere, and is
enforced strictly: Pillow only warns between 1x and 2x the limit, we refuse anything above it.
Helpers readers share beside `visionflow.formats`' checks: `coords_absurd` (NaN, infinite or
wildly out-of-frame coordinates) and `FRAME_POLICIES` (their counted kinds).
"""
from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import math
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageOps

from visionflow.core.files import file_digest

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
ABSURD_FACTOR = 100  # a coordinate further than 100 image sizes from the frame is not a typo we can clip

# Counted kinds for the helpers below; a reader merges them into its policy table.
FRAME_POLICIES: dict[str, str] = {
    "box_absurd": f"instance dropped (a box or polygon coordinate is NaN, infinite or more than "
                  f"{ABSURD_FACTOR}x the image size outside it)",
    "exif_orientation_mismatch": "declared width/height are the RAW size of an EXIF-rotated image: the "
                                 "annotator ignored EXIF; boxes and polygons are mapped from the raw frame "
                                 "to the displayed frame",
}


class ImageReadError(ValueError):
    """The file is not a readable image (corrupt, truncated, unknown format or too large)."""


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def probe_image(path: str | Path) -> tuple[int, int, str]:
    """(width, height, sha256) of an image file, width/height after EXIF orientation.

    Raises ImageReadError for a corrupt or truncated file. PNG is checked with `verify()`
    (chunk CRCs up to IEND, no pixel decoding); other formats have no real `verify()` in
    Pillow, so they are decoded with `load()`, the only way to notice a truncated JPEG.
    Pillow's decompression-bomb limit stays on: a huge image is an error, not a hang.
    """
    path = Path(path)
    data = path.read_bytes()  # read once: hashed and decoded from memory
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixel_limit(img, path)
            is_png = img.format == "PNG"
            if is_png:
                img.verify()  # must come first: it consumes the file handle
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = _orientation(img)
            if not is_png:
                if img.format == "JPEG":
                    # Decode at 1/8 scale: libjpeg still walks the whole entropy-coded stream,
                    # so truncation and bad data are caught, for a fraction of the IDCT work.
                    img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
    except (FileNotFoundError, ImageReadError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: exceeds the pixel limit Image.MAX_IMAGE_PIXELS "
                             f"(decompression-bomb guard; {exc})") from exc
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        # Pillow reports truncation and bad data as OSError/SyntaxError, depending on the codec.
        raise ImageReadError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from exc
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return width, height, hashlib.sha256(data).hexdigest()


def _check_pixel_limit(img: Image.Image, path: Path) -> None:
    # Pillow raises only above 2x MAX_IMAGE_PIXELS (a warning between 1x and 2x); a warning
    # would let a 170-megapixel image through, so the limit itself is the error here.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise ImageReadError(f"{path}: {img.width}x{img.height} = {img.width * img.height} pixels exceeds "
                             f"the pixel limit Image.MAX_IMAGE_PIXELS ({limit}; decompression-bomb guard)")


def exif_orientation(path: str | Path) -> tuple[int, int, int]:
    """(EXIF orientation 1-8, raw width, raw height) from the file header (no pixel decoding)."""
    with Image.open(path) as img:
        return _orientation(img), img.width, img.height


def raw_to_displayed(xs: Iterable[float], ys: Iterable[float], orientation: int, raw_w: float,
                     raw_h: float) -> tuple[list[float], list[float]]:
    """Points in the RAW (stored) frame -> the displayed frame `ImageOps.exif_transpose` shows.

    Continuous pixel coordinates (edges at 0 and raw_w), so a box maps to a box. Orientations
    5-8 swap the axes: the displayed image is raw_h wide and raw_w high.
    """
    xs, ys = list(xs), list(ys)
    w, h = raw_w, raw_h
    maps = {
        1: lambda x, y: (x, y),
        2: lambda x, y: (w - x, y),  # mirrored left-right
        3: lambda x, y: (w - x, h - y),  # rotated 180
        4: lambda x, y: (x, h - y),  # mirrored top-bottom
        5: lambda x, y: (y, x),  # transposed
        6: lambda x, y: (h - y, x),  # stored rotated 90 ccw: shown turned 90 cw
        7: lambda x, y: (h - y, w - x),  # transversed
        8: lambda x, y: (y, w - x),  # stored rotated 90 cw: shown turned 90 ccw
    }
    f = maps.get(orientation, maps[1])
    pts = [f(x, y) for x, y in zip(xs, ys)]
    return [p[0] for p in pts], [p[1] for p in pts]


def coords_absurd(xs: Iterable[float], ys: Iterable[float], width: int, height: int) -> bool:
    """True when any coordinate is NaN, infinite or more than ABSURD_FACTOR image sizes away.

    Written with `math.isfinite` and explicit bounds because NaN fails every comparison: a
    check like `x2 > x1` would silently let a NaN box through or misname the problem.
    """
    lim_x, lim_y = ABSURD_FACTOR * width, ABSURD_FACTOR * height
    return (any(not math.isfinite(x) or not -lim_x <= x <= lim_x + width for x in xs)
            or any(not math.isfinite(y) or not -lim_y <= y <= lim_y + height for y in ys))


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except (TypeError, ValueError, SyntaxError):  # unparsable EXIF: the image is shown as stored
        return 1


# The size an image of (height, width) pixels is brought to for the model (rows, cols): what a
# reduced decode must not go below (augment.DecodeFit; None decodes every image in full).
Fit = Callable[[int, int], tuple[int, int]]
REDUCTIONS = (8, 4, 2)  # libjpeg's scaled IDCT: 1/8, 1/4, 1/2


def load_rgb(path: str | Path, fit: Fit | None = None) -> np.ndarray:
    """The image as (H, W, 3) uint8 RGB, EXIF orientation applied.

    Every mode is converted explicitly, because Pillow's `convert("RGB")` clips 16-bit data to
    255 and drops alpha without compositing:
      L, 1, P, CMYK, YCbCr, LAB, HSV -> Pillow's conversion to RGB
      LA, RGBA, PA, P with transparency -> composited over black (transparent pixels are 0)
      I;16*, I (16-bit)  -> scaled by 255/65535, then grey -> RGB
      F                  -> assumed 0..255, clipped, then grey -> RGB

    fit: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size inside the IDCT (`jpeg_reduction`)
    when that is still at least fit(height, width) in both directions; the image is then that
    much smaller (ceil(side / factor)). Other formats decode in full.
    """
    with Image.open(path) as img:
        _check_pixel_limit(img, Path(path))
        return image_rgb(img, lambda: np.fromfile(path, dtype=np.uint8), fit)


def jpeg_reduction(img: Image.Image, orientation: int, fit: Fit | None) -> int:
    """The largest factor f of REDUCTIONS for which the JPEG, decoded at 1/f of its size (each side
    ceil(side / f)), is still at least fit(height, width) of its displayed (EXIF-oriented) size in
    both directions; 1 when none is, for other formats, or without fit. Quality: the scaled IDCT
    averages each 8x8 block's frequencies, so the pixels are a proper downscale, where a resize by
    more than 2x with INTER_LINEAR skips pixels."""
    if fit is None or img.format != "JPEG":
        return 1
    w, h = img.size  # stored
    rows, cols = fit(*((w, h) if orientation in _SWAPS_AXES else (h, w)))
    if orientation in _SWAPS_AXES:
        rows, cols = cols, rows  # the stored frame's
    for f in REDUCTIONS:
        reduced_w, reduced_h = reduced_size((w, h), f)
        if reduced_h >= rows and reduced_w >= cols:
            return f
    return 1


def reduced_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(width, height) of a JPEG of `size` decoded at 1/factor: each side ceil(side / factor)."""
    return -(-size[0] // factor), -(-size[1] // factor)


def image_rgb(img: Image.Image, data: Callable[[], np.ndarray], fit: Fit | None = None) -> np.ndarray:
    """An opened (not yet decoded) image as `load_rgb` returns it: (H, W, 3) uint8 RGB, EXIF
    orientation applied, every mode converted as load_rgb says, JPEGs reduced under `fit` as
    load_rgb says. `data()` gives the encoded bytes as a uint8 array (read only for an RGB JPEG,
    which OpenCV decodes). For images that do not come from a file: `serve` and the MLflow pyfunc
    decode uploads with it, so a served model sees the pixels `predict` and training see."""
    orientation = _orientation(img) if img.format == "JPEG" else 1
    factor = jpeg_reduction(img, orientation, fit)
    if img.format == "JPEG" and img.mode == "RGB":
        fast = _decode_rgb_jpeg(data(), orientation, img.size, factor)
        if fast is not None:
            return fast
    if factor > 1:  # Pillow's draft: the same scaled IDCT as OpenCV's reduced modes, bit for bit
        w, h = img.size
        img.draft(img.mode, (w // factor, h // factor))
        if img.size != reduced_size((w, h), factor):
            raise ImageReadError(f"JPEG reduced by {factor} decoded to {img.size}, not the expected size")
    img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


# EXIF orientation -> the same pixels as ImageOps.exif_transpose, as numpy views.
_ORIENT = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # ROTATE_270: shown turned 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
    8: lambda a: a.transpose(1, 0, 2)[::-1],  # ROTATE_90: shown turned 90 degrees counter-clockwise
}


def _decode_rgb_jpeg(data: np.ndarray, orientation: int, size: tuple[int, int], factor: int = 1):
    """A baseline or progressive RGB JPEG decoded by OpenCV's libjpeg-turbo straight into a numpy
    array, or None to leave it to Pillow. The pixels are Pillow's (same IDCT and upsampling;
    checked bit for bit in tests/test_coco.py, and at 1/2, 1/4 and 1/8 scale, Pillow's draft, in
    tests/test_reduced_decode.py); it skips Pillow's copies (exif_transpose's and the RGBX -> RGB
    packing of np.asarray): 1.6 ms instead of 3.9 ms for a 640x480 photo here.
    A file that does not end in the JPEG end-of-image marker (truncated) goes to Pillow, which
    refuses it as before; so does anything OpenCV cannot decode to the header's size."""
    import cv2

    if data.size < 4 or data[-2] != 0xFF or data[-1] != 0xD9:
        return None
    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION | _CV2_REDUCED[factor]
    arr = cv2.imdecode(data, flags)
    width, height = reduced_size(size, factor)
    if arr is None or arr.shape != (height, width, 3):
        return None
    turn = _ORIENT.get(orientation)
    return np.ascontiguousarray(turn(arr)) if turn else arr


# OpenCV's reduced colour modes without their BGR bit (IMREAD_REDUCED_COLOR_2 is 16 | IMREAD_COLOR)
_CV2_REDUCED = {1: 0, 2: 16, 4: 32, 8: 64}


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode != "F":
            arr = arr * (255.0 / 65535.0)
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        rgba = np.asarray(img, dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255  # premultiply = composite over black
        return np.ascontiguousarray(rgb.astype(np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


# --- images as base64 PNG/JPEG text (pyfunc and HTTP payloads) ---

def encode_image(image: np.ndarray, fmt: str = "PNG") -> str:
    """RGB (H, W, 3) or single-channel (H, W) uint8 -> base64 text of the encoded image."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask(mask_png: str) -> np.ndarray:
    """A segment model's `mask_png` cell -> (H, W) uint8 class values."""
    with Image.open(io.BytesIO(base64.b64decode(mask_png))) as im:
        return np.asarray(im)
