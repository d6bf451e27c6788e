"""Image files: probing (size, content hash, integrity) and the one RGB loader training uses.

Sizes are always reported AFTER EXIF orientation, the way `ImageOps.exif_transpose` shows the
image: orientations 5-8 rotate by 90 degrees, so width and height swap. Annotations are in
that displayed frame, so the manifest's width/height must be too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from visionflow.io import file_digest

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


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
    try:
        with Image.open(path) as img:
            is_png = img.format == "PNG"
            if is_png:
                img.verify()  # must come first: it consumes the file handle
        with Image.open(path) as img:
            width, height = img.size
            orientation = _orientation(img)
            if not is_png:
                img.load()
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        # Pillow reports truncation and bad data as OSError/SyntaxError, depending on the codec.
        raise ImageReadError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from exc
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return width, height, sha256_file(path)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except (TypeError, ValueError, SyntaxError):  # unparsable EXIF: the image is shown as stored
        return 1


def load_rgb(path: str | Path) -> np.ndarray:
    """The image as (H, W, 3) uint8 RGB, EXIF orientation applied.

    Every mode is converted explicitly, because Pillow's `convert("RGB")` clips 16-bit data to
    255 and drops alpha without compositing:
      L, 1, P, CMYK, YCbCr, LAB, HSV -> Pillow's conversion to RGB
      LA, RGBA, PA, P with transparency -> composited over black (transparent pixels are 0)
      I;16*, I (16-bit)  -> scaled by 255/65535, then grey -> RGB
      F                  -> assumed 0..255, clipped, then grey -> RGB
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


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
