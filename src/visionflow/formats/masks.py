"""Semantic-segmentation masks as PNG (Pascal VOC / ADE20K style) <-> canonical samples.

Layout (`annotations` is the masks folder):

    images_root/a/x.jpg          an image (.jpg .jpeg .png .bmp .tif .tiff .webp)
    masks/a/x.png                its mask: same relative path, extension .png
    classes.txt | classes.json | classes.yaml   next to the masks folder, or inside it
    masks/train/a/x.png, masks/val/...           split layout: when every top-level folder of the
                                                 masks folder is a split folder (train, val, valid,
                                                 validation, test), it becomes the sample's
                                                 attributes["split"] (the path keeps the folder)

Roboflow's "PNG Masks for Semantic Segmentation" export (images and masks given as one folder):

    train/x_jpg.rf.ab12.jpg        an image
    train/x_jpg.rf.ab12_mask.png   its mask: beside it, the image's stem + "_mask.png"
    train/_classes.csv             "Pixel Value, Class" then "0, background", "1, cabinet", ...
    valid/..., test/...            one table per split folder (all equal), or one flat folder

Class table (pixel value -> class; 255 is always "ignore"; a value 0 named background,
_background_, __background__ or bg (any case) is the unlabelled background, no category):
    classes.txt     one name per line; the line index (from 0) is the pixel value
    labelmap.txt    CVAT's / Datumaro's `name:r,g,b:parts:actions` lines (`#` comments left out):
                    the line index is the value, r,g,b its colour (CVAT's "Segmentation mask 1.1"
                    export: JPEGImages/, SegmentationClass/ RGB masks, labelmap.txt)
    _classes.csv    Roboflow's `Pixel Value, Class` table (see above)
    .json / .yaml   a list of names (index = value), or a mapping {value: name}; an entry may be
                    {"name": ..., "color": [r, g, b]} so RGB colour masks can be read; an entry
                    for value 255 only gives the colour of the ignore region (it is no class)
Masks are palette ('P'), greyscale ('L', '1') or 16-bit ('I;16', read as their integer values,
never rescaled) PNGs whose pixel value is the class value; RGB(A) masks are read by colour
(alpha ignored) when the class table gives colours.

Canonical representation of one mask:
    for each class value present, one Instance: category_id = the value, `rle` = COCO RLE of
    that class's pixels (pycocotools on a Fortran-ordered uint8 (H, W) array, counts as str),
    bbox = pixel bounds in continuous xyxy (x2 = last column + 1), area = pixel count,
    iscrowd = False, attributes = {"semantic": True}
    the ignore region (255) -> Sample.attributes["ignore_rle"] (same RLE encoding)
    background (value 0 with a background name, see `formats.is_background`) -> no instance: its
    pixels are the ones no instance covers, what the segment task trains as its class 0 and the
    detect task never boxes (as in the VOC reader). A value 0 with any other name is a class like
    the rest. Category ids are the class values; masks round-trip pixel-equal.

Validation policy (errors stop the read; counted problems are fixed or dropped and reported):

| problem                                               | policy                                      |
|-------------------------------------------------------|---------------------------------------------|
| masks folder or class table missing; two class tables | DataError naming the folder / files         |
|   (Roboflow: split folders' _classes.csv that differ) |                                             |
| class table malformed (empty line, bad value, dup     | DataError naming the file and line / class  |
|   name or colour, invalid JSON/YAML)                  |                                             |
| image or mask path unsafe or resolving outside root   | DataError naming the file                   |
| two images sharing one mask (a/x.jpg and a/x.png)     | DataError naming both                       |
| mask PNGs with values outside the class table (not    | DataError naming the mask, the values and   |
|   255), 8- or 16-bit                                  |   their pixel counts                        |
| RGB mask with unknown colours / table without colours | DataError naming the mask and the colours   |
| mask not a readable PNG, or an unsupported mode       | DataError naming the mask                   |
| no image; no mask; no mask named as any image; no     | DataError naming both folders and an        |
|   mask usable (all lost to the counted kinds)         |   example image and mask name               |
| class table naming only the background; every mask   | DataError naming the table / masks folder   |
|   background only                                     |                                             |
| mask_missing: image without a mask                    | sample kept without instances, counted      |
| mask_orphan: mask without an image                    | mask ignored, counted                       |
| mask_not_png: non-PNG file in the masks folder        | file ignored, counted                       |
| mask_size_mismatch: mask size != image size (after    | image skipped with its mask, counted (both  |
|   EXIF orientation)                                   |   files and sizes named)                    |
| image_unreadable (COMMON_POLICIES)                    | image skipped with its mask, counted        |

Writer: `out_dir/images/[split/]<path>`, `out_dir/masks/[split/]<path without ext>.png` as
palette PNGs (a fixed VOC-style palette; 0 = background, the pixels no instance covers; the
categories in id order are 1..K, as the VOC writer numbers them; 255 = ignore; the split folder
when every sample has a train/val/test split) and `out_dir/classes.txt` (`background`, then the
categories). Instances are painted in manifest order (later on top), the ignore region last;
see WRITE_POLICIES for what a mask cannot hold.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Optional

import numpy as np
import yaml
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.formats import (COMMON_POLICIES, ConversionReport, FormatResult, check_inside, clip_box, copy_image,
                                is_background, probe, safe_relpath)
from visionflow.core.files import write_text, write_with
from visionflow.manifest import SPLIT_FOLDERS, SPLITS, Category, Instance, Sample
from visionflow.manifest.masks import (IGNORE, PALETTE, decode_rle, encode_rle, instance_mask,  # noqa: F401
                                       paint, semantic_mask)

IMAGES_DIR, MASKS_DIR = "images", "masks"
# labelmap.txt: CVAT's "Segmentation mask 1.1" (and Datumaro's) `name:r,g,b:parts:actions`, line
# index (comments left out) = the pixel value of palette masks, the colours those of RGB masks
CLASS_FILES = ("classes.txt", "classes.json", "classes.yaml", "classes.yml", "labelmap.txt")
ROBOFLOW_TABLE, ROBOFLOW_SUFFIX = "_classes.csv", "_mask"  # masks beside their images (Roboflow)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SEMANTIC = {"semantic": True}

MASK_POLICIES: dict[str, str] = {
    "mask_missing": "image kept without instances, so it trains as background only (no mask PNG with its "
                    "relative path)",
    "mask_orphan": "mask ignored (no image with the same relative path)",
    "mask_not_png": "file in the masks folder ignored (masks must be PNG: lossy formats change class values)",
    "mask_size_mismatch": "image skipped with its mask (mask and image sizes differ)",
}

WRITE_POLICIES: dict[str, str] = {
    "instance_overlap_flattened": "pixels of an instance painted over by a later instance of another class "
                                  "(or the ignore region) take the later value",
    "instance_identity_lost": "instances of one class in an image merge into one class region",
    "box_only_dropped": "instance without polygon or RLE not painted",
    "polygon_rasterised": "polygon painted as pixels (COCO rasterisation); read back as a pixel RLE",
    "crowd_flag_dropped": "crowd region painted as its class; the iscrowd flag is not kept",
    "attributes_dropped": "sample/instance attributes are not written",
    "split_dropped": "split not written: not every sample has a train/val/test split, so the tree is flat",
    "image_labels_dropped": "image-level labels are not written",
    "group_dropped": "sample group is not written",
    "background_category_merged": "a category with a background name is written as value 0, with the pixels "
                                  "no instance covers; read back, value 0 is background, not a category",
}


@dataclass
class ClassTable:
    path: Path
    names: dict[int, str]  # pixel value (0..254) -> class name, in value order
    colors: dict[tuple[int, int, int], int] = field(default_factory=dict)  # RGB -> value (255 = ignore)


# --- reading ---------------------------------------------------------------------------------

def read_masks(images_root: Path, annotations: Path, source: str, root: Optional[str] = None) -> FormatResult:
    images_root, masks_dir = Path(images_root), Path(annotations)
    if not masks_dir.is_dir():
        raise DataError(masks_dir, "masks folder not found", hint="check ingest.sources[].annotations")
    beside = roboflow_layout(images_root, masks_dir)
    table = read_class_table(_roboflow_table(masks_dir) if beside else find_class_table(masks_dir))
    background = 0 if is_background(table.names.get(0, "")) else None
    categories = [Category(id=v, name=n, source_ids={source: v}) for v, n in table.names.items() if v != background]
    report = ConversionReport({**COMMON_POLICIES, **MASK_POLICIES})
    suffix = ROBOFLOW_SUFFIX if beside else ""
    masks = _list_masks(masks_dir, table.path, report, suffix)
    root = images_root.as_posix() if root is None else root
    samples = []
    by_split = _split_layout(masks_dir, table.path) if not beside else \
        any(p.is_dir() and p.name.lower() in SPLIT_FOLDERS for p in masks_dir.iterdir())
    images = _list_images(images_root, masks_dir, suffix)
    _check_names_match(images, masks, images_root, masks_dir)
    if not categories:
        raise DataError(table.path, f"the class table names only the background ({table.names[0]!r} at value 0)",
                        hint="add a line per class: the line index is the pixel value")
    read = 0  # samples kept with their mask
    for key, rel in images.items():
        mask_rel = masks.pop(key, None)
        sample = _to_sample(images_root, rel, mask_rel, masks_dir, table, background, source, root, report)
        if sample is not None:
            read += mask_rel is not None
            if by_split and SPLIT_FOLDERS.get(PurePosixPath(rel).parts[0].lower()) and "/" in rel:
                sample.attributes["split"] = SPLIT_FOLDERS[PurePosixPath(rel).parts[0].lower()]
            samples.append(sample)
    for rel in masks.values():
        report.add("mask_orphan", f"{masks_dir / rel}: no image {_key(rel)}.* in {images_root}")
    if not any(s.instances for s in samples):
        if read:
            raise DataError(masks_dir, f"all {read} masks read hold only the background (value 0, "
                            f"{table.names[0]!r} in {table.path.name}) or the ignore value 255",
                            hint="check that the masks are the class masks, not empty exports")
        raise DataError(masks_dir, "no mask could be used: " + "; ".join(report.lines()),
                        hint="see the counted kinds")
    return FormatResult(categories, samples, report)


def _check_names_match(images: dict[str, str], masks: dict[str, str], images_root: Path, masks_dir: Path) -> None:
    """A masks folder whose names match no image is an error naming both folders and an example
    of each name, never a dataset of unlabelled images."""
    exts = " ".join(sorted(IMAGE_EXTENSIONS))
    if not images:
        raise DataError(images_root, f"no images ({exts}) found in it or its subfolders",
                        hint="set --images to the folder that holds the images the masks belong to")
    if not masks:
        raise DataError(masks_dir, "no mask PNGs found in it or its subfolders",
                        hint="set --annotations to the folder of PNG masks (one per image)")
    if images.keys() & masks.keys():
        return
    image, mask = next(iter(images.values())), next(iter(masks.values()))
    raise DataError(masks_dir, f"none of its {len(masks)} masks has the name of one of the {len(images)} images in "
                    f"{images_root}: image {image!r} needs the mask {_key(image) + '.png'!r}, masks are named like "
                    f"{mask!r}", hint="name each mask as its image with .png, at the same relative path under the "
                    "masks folder, or point --images and --annotations at folders that match")


def _split_layout(masks_dir: Path, table_path: Path) -> bool:
    """True when the masks folder holds split folders only (masks/train/..., masks/val/...)."""
    top = [p for p in masks_dir.iterdir() if p != table_path and not p.name.startswith(".")]
    return bool(top) and all(p.is_dir() and p.name.lower() in SPLIT_FOLDERS for p in top)


def roboflow_layout(images_root: Path, masks_dir: Path) -> bool:
    """Images and masks in one folder, each mask named <image stem>_mask.png (Roboflow's export)."""
    if Path(images_root).resolve() != Path(masks_dir).resolve():
        return False
    return next(Path(masks_dir).rglob(f"*{ROBOFLOW_SUFFIX}.png"), None) is not None


def _roboflow_table(folder: Path) -> Path:
    """The _classes.csv of the folder or, in a split export, of its split folders (all equal)."""
    found = [p for p in [folder / ROBOFLOW_TABLE, *(d / ROBOFLOW_TABLE for d in sorted(folder.iterdir())
                                                    if d.is_dir() and d.name.lower() in SPLIT_FOLDERS)] if p.is_file()]
    if not found:
        raise DataError(folder, f"masks named <image>{ROBOFLOW_SUFFIX}.png beside the images, but no {ROBOFLOW_TABLE} in "
                        f"it or its split folders", hint="put Roboflow's _classes.csv (Pixel Value, Class) there")
    first = found[0].read_bytes()
    for other in found[1:]:
        if other.read_bytes().strip() != first.strip():
            raise DataError(other, f"differs from {found[0]}: the splits must share one class table",
                            hint="re-export the dataset, or make the tables equal")
    return found[0]


def find_class_table(masks_dir: Path) -> Path:
    """The class table inside the masks folder, else next to it; two candidates are an error."""
    for folder in (masks_dir, masks_dir.parent):
        found = [folder / n for n in CLASS_FILES if (folder / n).is_file()]
        if len(found) > 1:
            raise DataError(folder, f"several class tables ({', '.join(p.name for p in found)})", hint="keep one")
        if found:
            return found[0]
    raise DataError(masks_dir, "no class table found",
                    hint=f"put one of {', '.join(CLASS_FILES)} next to the masks folder or inside it")


def read_class_table(path: Path) -> ClassTable:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc})") from None
    if path.name == ROBOFLOW_TABLE:
        doc = _roboflow_rows(path, text)
    elif path.name == "labelmap.txt":
        from visionflow.formats.voc import labelmap_rows

        doc: Any = [{"name": name, "color": list(colour)} if colour else name for _, name, colour in labelmap_rows(text)]
    elif path.suffix == ".txt":
        lines = text.rstrip().splitlines() if text.strip() else []
        for i, line in enumerate(lines):
            if not line.strip():
                raise DataError(path, "empty class name", record=f"line {i + 1}",
                                hint="the line index is the pixel value, so every line needs a name")
        doc = [line.strip() for line in lines]
    else:
        doc = _load_structured(path, text)
    if isinstance(doc, list):
        items = list(enumerate(doc))
    elif isinstance(doc, dict):
        items = [(_int_key(k, path), v) for k, v in doc.items()]
    else:
        raise DataError(path, "class table must be a list of names or a mapping {value: name}")
    if not items:
        raise DataError(path, "class table is empty")
    table = ClassTable(path, {})
    for value, entry in sorted(items, key=lambda kv: kv[0]):
        _add_class(table, value, entry)
    return table


def _roboflow_rows(path: Path, text: str) -> dict[int, str]:
    """Roboflow's `Pixel Value, Class` table -> {value: name}."""
    import csv
    import io

    rows = [[c.strip() for c in r] for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows or [c.lower() for c in rows[0][:2]] != ["pixel value", "class"]:
        raise DataError(path, f"header is {rows[0] if rows else 'missing'}, expected 'Pixel Value, Class'",
                        record="line 1")
    out: dict[int, str] = {}
    for lineno, row in enumerate(rows[1:], 2):
        if len(row) < 2 or not row[0].isdigit():
            raise DataError(path, f"row {row} is not '<pixel value>, <class>'", record=f"line {lineno}")
        if int(row[0]) in out:
            raise DataError(path, f"value {row[0]} given twice", record=f"line {lineno}")
        out[int(row[0])] = row[1]
    return out


def _load_structured(path: Path, text: str) -> Any:
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON: {exc.msg}", record=f"line {exc.lineno}, column {exc.colno}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(path, f"invalid YAML: {exc}", record=f"line {mark.line + 1}" if mark else None) from None


def _int_key(key: Any, path: Path) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    raise DataError(path, f"class value {key!r} is not an integer", record=f"class {key!r}")


def _add_class(table: ClassTable, value: int, entry: Any) -> None:
    record = f"class {value}"
    name, color = (entry, None) if isinstance(entry, str) else \
        (entry.get("name"), entry.get("color")) if isinstance(entry, dict) else (None, None)
    if not isinstance(name, str) or not name.strip():
        raise DataError(table.path, f"entry {entry!r} needs a non-empty name", record=record)
    name = name.strip()
    if not 0 <= value <= IGNORE:
        raise DataError(table.path, f"value {value} is not a pixel value 0..254 (255 = ignore)", record=record)
    if value in table.names:
        raise DataError(table.path, f"value {value} given twice", record=record)
    if value != IGNORE and name in table.names.values():
        raise DataError(table.path, f"duplicate class name {name!r}", record=record)
    if color is not None:
        if not (isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255
                                                                    for c in color)):
            raise DataError(table.path, f"color {color!r} is not [r, g, b] with 0..255", record=record)
        if tuple(color) in table.colors:
            raise DataError(table.path, f"color {color} also used by class {table.colors[tuple(color)]}", record=record)
        table.colors[tuple(color)] = value
    if value != IGNORE:  # 255 only names the ignore colour
        table.names[value] = name


def _list_masks(masks_dir: Path, table_path: Path, report: ConversionReport, suffix: str = "") -> dict[str, str]:
    """Key (relative path without extension) -> mask path relative to the masks folder. With a
    `suffix` (Roboflow: "_mask"), masks are the PNGs whose stem ends with it, beside the images
    and tables (not counted as anything); the key drops it."""
    masks: dict[str, str] = {}
    for path in sorted(p for p in masks_dir.rglob("*") if p.is_file() and p != table_path):
        if suffix and not (path.suffix.lower() == ".png" and path.stem.endswith(suffix)):
            continue
        rel = _checked_rel(masks_dir, path)
        if path.suffix.lower() != ".png":
            report.add("mask_not_png", f"{path}: not a .png file")
            continue
        key = _key(rel)
        masks[key[:len(key) - len(suffix)]] = rel
    return masks


def _list_images(images_root: Path, masks_dir: Path, suffix: str = "") -> dict[str, str]:
    """Key -> image path relative to the images root, skipping the masks folder if it is inside
    (with a mask `suffix`, images and masks share folders: the masks are skipped by name)."""
    masks_abs = masks_dir.resolve()
    images: dict[str, str] = {}
    for path in sorted(images_root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file() or \
                (path.stem.endswith(suffix) if suffix else path.parent.resolve().is_relative_to(masks_abs)):
            continue
        rel = _checked_rel(images_root, path)
        key = _key(rel)
        if key in images:
            raise DataError(images_root, f"images {images[key]!r} and {rel!r} would share the mask {key}.png",
                            hint="rename one of them")
        images[key] = rel
    return images


def _checked_rel(root: Path, path: Path) -> str:
    try:
        rel = safe_relpath(path.relative_to(root).as_posix())
        check_inside(root, rel)
    except ValueError as exc:
        raise DataError(path, f"unsafe path: {exc}", hint="paths must stay inside the dataset root") from None
    return rel


def _key(rel: str) -> str:
    return PurePosixPath(rel).with_suffix("").as_posix()


def _to_sample(images_root: Path, rel: str, mask_rel: Optional[str], masks_dir: Path, table: ClassTable,
               background: Optional[int], source: str, root: str, report: ConversionReport) -> Optional[Sample]:
    image = images_root / rel
    probed = probe(image, (None, None), report, str(image))
    if probed is None:
        return None
    width, height, sha = probed
    sid = f"{source}/{rel}"
    sample = Sample(id=sid, root=root, path=rel, width=width, height=height, sha256=sha, group=sid)
    if mask_rel is None:
        report.add("mask_missing", f"{image}: no mask {masks_dir / _key(rel)}.png")
        return sample
    mask_path = masks_dir / mask_rel
    values = read_mask(mask_path, table)
    if values.shape != (height, width):
        report.add("mask_size_mismatch", f"{mask_path} is {values.shape[1]}x{values.shape[0]}, "
                                         f"image {image} is {width}x{height}")
        return None
    sample.instances, ignore = _instances(values, background, report, str(mask_path))
    if ignore is not None:
        sample.attributes["ignore_rle"] = ignore
    return sample


def read_mask(path: Path, table: ClassTable) -> np.ndarray:
    """(H, W) array of class values (255 = ignore), every value checked against the table."""
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise DataError(path, f"mask is a {img.format} file, not a PNG", hint="export masks as PNG")
            img.load()
            if img.mode in ("1", "L", "P") or img.mode.startswith("I;16") or img.mode == "I":
                values = np.asarray(img)
                values = values.astype(np.uint8) if img.mode == "1" else values  # bool -> 0/1
            elif img.mode in ("RGB", "RGBA"):
                values = _colours_to_values(np.asarray(img)[..., :3], table, path)
            else:
                raise DataError(path, f"unsupported mask mode {img.mode!r}",
                                hint="use palette, greyscale or RGB PNGs")
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's ways of saying "corrupt"
        raise DataError(path, f"not a readable PNG mask ({exc.__class__.__name__}: {exc})") from None
    found, counts = np.unique(values, return_counts=True)
    bad = [(int(v), int(n)) for v, n in zip(found, counts) if v != IGNORE and int(v) not in table.names]
    if bad:
        listed = ", ".join(f"{v} ({n} px)" for v, n in bad)
        raise DataError(path, f"pixel values outside the class table {table.path}: {listed}",
                        hint="add them to the class table or set them to 255 (ignore)")
    return values


def _colours_to_values(rgb: np.ndarray, table: ClassTable, path: Path) -> np.ndarray:
    if not table.colors:
        raise DataError(path, f"RGB mask, but the class table {table.path} gives no colours",
                        hint='give each class a "color": [r, g, b], or use palette/greyscale masks')
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    colours, inverse, counts = np.unique(packed.ravel(), return_inverse=True, return_counts=True)
    lut, unknown = [], []
    for c, n in zip(colours.tolist(), counts.tolist()):
        colour = (c >> 16, (c >> 8) & 255, c & 255)
        lut.append(table.colors.get(colour, 0))
        if colour not in table.colors:
            unknown.append(f"{list(colour)} ({n} px)")
    if unknown:
        raise DataError(path, f"colours not in the class table {table.path}: {', '.join(unknown)}",
                        hint="add them with their class value")
    return np.asarray(lut, dtype=np.uint8)[inverse.ravel()].reshape(rgb.shape[:2])


def _instances(values: np.ndarray, background: Optional[int], report: ConversionReport,
               where: str) -> tuple[list[Instance], Optional[dict]]:
    instances, ignore = [], None
    height, width = values.shape
    for value in np.unique(values).tolist():
        if value == background:  # the pixels no instance covers
            continue
        pixels = values == value
        rle = encode_rle(pixels)
        if value == IGNORE:
            ignore = rle
            continue
        cols, rows = np.flatnonzero(pixels.any(axis=0)), np.flatnonzero(pixels.any(axis=1))
        # Continuous coordinates: a pixel (col c) covers [c, c + 1).
        box = clip_box([float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)],
                       width, height, report, f"{where} class {value}")
        instances.append(Instance(bbox=box, category_id=int(value), rle=rle, iscrowd=False,
                                  area=float(pixels.sum()), attributes=dict(SEMANTIC)))
    return instances, ignore


# --- writing ---------------------------------------------------------------------------------

def write_masks(samples: Iterable[Sample], categories: list[Category], out_dir: Path,
                project_root: Path = Path("."), copy_images: bool = True,
                report: Optional[ConversionReport] = None) -> Path:
    """Write `out_dir/masks/<path>.png`, the class table and (with `copy_images`) `out_dir/images/`.

    Returns the masks folder (the reader's `annotations`; its images root is `out_dir/images`).
    A sample with nothing to paint (no instances, no ignore region) gets no mask, so it reads back
    as it came (`mask_missing`) instead of as an all-background image.
    """
    out_dir, project_root = Path(out_dir), Path(project_root)
    values = mask_values(categories)
    losses = ConversionReport(WRITE_POLICIES)
    for c in categories:
        if values[c.id] == 0:
            losses.add("background_category_merged", f"category {c.id} ({c.name!r})")
    used: dict[str, str] = {}
    samples = list(samples)
    by_split = bool(samples) and all(s.attributes.get("split") in SPLITS for s in samples)
    for s in samples:
        rel = _split_relpath(s.path, s.attributes["split"]) if by_split else s.path
        mask_rel = _key(rel) + ".png"
        if mask_rel in used:
            raise ValueError(f"samples {used[mask_rel]} and {s.id} would share the mask {mask_rel!r}")
        used[mask_rel] = s.id
        _count_sample_losses(s, losses, by_split)
        canvas = paint(s, values, 0, losses)
        if canvas is not None:
            write_with(out_dir / MASKS_DIR / mask_rel, lambda tmp, c=canvas: _palette_png(c).save(tmp, format="PNG"))
        if copy_images:
            copy_image(s, out_dir / IMAGES_DIR / rel, project_root)
    names = ["background", *(c.name for c in sorted(categories, key=lambda c: c.id) if values[c.id])]
    write_text(out_dir / "classes.txt", "".join(f"{n}\n" for n in names))
    if report is not None:
        report.merge(losses)
    return out_dir / MASKS_DIR


def mask_values(categories: list[Category]) -> dict[int, int]:
    """Category id -> pixel value: 0 for a category with a background name (the unlabelled
    pixels), the others 1..K in id order (the VOC writer's numbering)."""
    values: dict[int, int] = {}
    classes = 0
    for c in sorted(categories, key=lambda c: c.id):
        if c.id in values:
            raise ValueError(f"category id {c.id} ({c.name!r}) given twice")
        background = is_background(c.name)
        classes += not background
        values[c.id] = 0 if background else classes
    if classes >= IGNORE:
        raise ValueError(f"{classes} categories do not fit a mask: its values are 1..254 for "
                         f"classes (0 background, 255 ignore)")
    return values


def _split_relpath(path: str, split: str) -> str:
    """`<split>/<path>`; a path read from a split export already starts with its split folder."""
    first = PurePosixPath(path).parts[0]
    return path if "/" in path and SPLIT_FOLDERS.get(first.lower()) == split else f"{split}/{path}"


def _count_sample_losses(s: Sample, losses: ConversionReport, by_split: bool) -> None:
    if s.labels:
        losses.add("image_labels_dropped", f"{s.id}: labels {s.labels}")
    if s.group and s.group != s.id:
        losses.add("group_dropped", f"{s.id}: group {s.group!r}")
    if s.attributes.get("split") and not by_split:
        losses.add("split_dropped", f"{s.id}: split {s.attributes['split']!r}")
    extra = sorted(k for k in s.attributes if k not in ("ignore_rle", "split"))
    if extra:
        losses.add("attributes_dropped", f"{s.id}: sample attributes {extra}")
    per_class: dict[int, int] = {}
    for i, inst in enumerate(s.instances):
        where = f"{s.id} instance #{i}"
        per_class[inst.category_id] = per_class.get(inst.category_id, 0) + 1
        if inst.iscrowd:
            losses.add("crowd_flag_dropped", where)
        if inst.attributes and inst.attributes != SEMANTIC:
            losses.add("attributes_dropped", f"{where}: attributes {sorted(inst.attributes)}")
    for cid, n in per_class.items():
        if n > 1:
            losses.add("instance_identity_lost", f"{s.id}: {n} instances of category {cid}")


def _palette_png(values: np.ndarray) -> Image.Image:
    img = Image.frombytes("P", (values.shape[1], values.shape[0]), values.tobytes())
    img.putpalette(PALETTE)
    return img
