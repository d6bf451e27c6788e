"""The built-in shapes dataset: determinism, COCO validity, geometry and atomic replacement."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.core.config import SynthParams
from visionflow.datasets.synth import CATEGORIES, render_dataset
from visionflow.core.paths import Paths
from visionflow.stages.synth import synth

N, SIZE = 18, 64


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        m = mask.copy()
        m[1:] &= mask[:-1]
        m[:-1] &= mask[1:]
        m[:, 1:] &= mask[:, :-1]
        m[:, :-1] &= mask[:, 1:]
        mask = m
    return mask


def _coco(folder: Path) -> dict:
    return json.loads((folder / "annotations.json").read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "shapes"
    summary = render_dataset(out, n=N, size=SIZE, seed=3)
    coco = _coco(out)
    assert summary == {"images": N, "annotations": len(coco["annotations"]), "categories": 5}
    return out


def test_same_seed_is_byte_identical(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    render_dataset(again, n=N, size=SIZE, seed=3)
    first, second = _digests(dataset), _digests(again)
    assert "annotations.json" in first and len(first) == N + 1
    assert first == second


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    render_dataset(other, n=N, size=SIZE, seed=4)
    a, b = _digests(dataset), _digests(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_image_does_not_depend_on_n(dataset: Path, tmp_path: Path) -> None:
    fewer = tmp_path / "fewer"
    render_dataset(fewer, n=5, size=SIZE, seed=3)
    a, b = _digests(dataset), _digests(fewer)
    assert all(a[k] == b[k] for k in b if k.startswith("images/"))


def test_images_are_readable_jpeg_and_png_of_the_stated_size(dataset: Path) -> None:
    coco = _coco(dataset)
    formats = set()
    for im in coco["images"]:
        with Image.open(dataset / im["file_name"]) as img:
            img.load()
            formats.add(img.format)
            assert img.size == (im["width"], im["height"]) == (SIZE, SIZE)
            assert img.mode == "RGB"
            # A real picture, not a flat fill: the background is textured and noisy.
            assert np.asarray(img).std() > 5
        assert im["file_name"].endswith(".png" if img.format == "PNG" else ".jpg")
    assert formats == {"JPEG", "PNG"}
    assert sorted(p.name for p in (dataset / "images").iterdir()) == sorted(
        Path(im["file_name"]).name for im in coco["images"])


def test_coco_structure(dataset: Path) -> None:
    coco = _coco(dataset)
    assert [c["name"] for c in coco["categories"]] == list(CATEGORIES)
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5]
    assert {c["supercategory"] for c in coco["categories"]} == {"shape"}
    assert coco["info"] == {"description": coco["info"]["description"], "seed": 3, "n": N,
                            "size": SIZE, "version": coco["info"]["version"]}
    assert "z-order" in coco["note"]
    assert [im["id"] for im in coco["images"]] == list(range(1, N + 1))
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    assert all(a["iscrowd"] == 0 and a["category_id"] in range(1, 6) for a in anns)
    per_image = np.bincount([a["image_id"] for a in anns], minlength=N + 1)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 4
    assert per_image.max() > 1  # some images have distractors


def test_bboxes_are_inside_and_tight(dataset: Path) -> None:
    for a in _coco(dataset)["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
        poly = np.array(a["segmentation"][0]).reshape(-1, 2)
        assert len(a["segmentation"]) == 1 and len(poly) >= 3
        lo, hi = poly.min(axis=0), poly.max(axis=0)
        assert np.allclose(lo, [x, y], atol=1) and np.allclose(hi, [x + w, y + h], atol=1)
        # Smallest distractor is still a recognisable shape at 64 px.
        assert min(w, h) >= 7


def test_label_is_the_largest_shape_at_least_twice_any_other(dataset: Path) -> None:
    coco = _coco(dataset)
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    labels = []
    for im in coco["images"]:
        anns = sorted(by_image[im["id"]], key=lambda a: a["area"], reverse=True)
        assert len(im["labels"]) == 1 and im["labels"][0] == anns[0]["category_id"]
        if len(anns) > 1:
            assert anns[0]["area"] >= 2 * anns[1]["area"]
        labels.append(im["labels"][0])
    assert len(set(labels)) >= 3  # classes are drawn at random, not one fixed class


def test_pixels_match_annotations(dataset: Path) -> None:
    # Painting the polygons in z-order must reproduce the picture: inside each visible part
    # of a shape the colour is near-uniform (noise only), and differs from the background.
    from pycocotools.coco import COCO

    coco = COCO(str(dataset / "annotations.json"))
    for image_id in coco.getImgIds()[:8]:
        info = coco.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(dataset / info["file_name"]), dtype=np.float64)
        owner = np.zeros((SIZE, SIZE), dtype=int)  # index+1 of the top shape, 0 = background
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        for k, ann in enumerate(anns):
            owner[coco.annToMask(ann).astype(bool)] = k + 1
        background = _erode(owner == 0, 2)
        for k in range(1, len(anns) + 1):
            inner = _erode(owner == k, 2)  # edges differ between rasterisers and blur in JPEG
            if inner.sum() < 20:  # almost entirely hidden
                continue
            assert pixels[inner].std(axis=0).max() < 40
            if background.sum() >= 20:
                gap = np.abs(pixels[inner].mean(axis=0) - pixels[background].mean(axis=0)).max()
                assert gap > 25


def test_pycocotools_loads_and_masks_match_areas(dataset: Path) -> None:
    from pycocotools.coco import COCO

    coco = COCO(str(dataset / "annotations.json"))
    assert len(coco.getImgIds()) == N and len(coco.getCatIds()) == 5
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann)
        assert mask.shape == (SIZE, SIZE)
        assert abs(mask.sum() - ann["area"]) <= 0.15 * ann["area"] + 8


def test_stage_writes_to_synth_dir(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    summary = synth(SynthParams(n=6, size=SIZE, seed=1), paths)
    assert summary["images"] == 6 and summary["categories"] == 5
    coco = _coco(paths.synth_dir)
    assert paths.synth_dir == tmp_path / "data" / "shapes"
    assert len(coco["images"]) == 6 and len(coco["annotations"]) == summary["annotations"]
    assert coco["info"]["seed"] == 1


def test_existing_output_is_replaced_atomically(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    (out / "images").mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    (out / "images" / "999999.jpg").write_bytes(b"old")
    # Leftovers of an interrupted run are cleaned up too.
    (tmp_path / ".shapes.tmp-crashed").mkdir()

    render_dataset(out, n=4, size=SIZE, seed=0)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
    assert not (out / "stale.txt").exists() and not (out / "images" / "999999.jpg").exists()
    assert len(list((out / "images").iterdir())) == 4


def test_failed_render_keeps_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "shapes"
    render_dataset(out, n=3, size=SIZE, seed=0)
    before = _digests(out)

    import visionflow.datasets.synth as synth_mod

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth_mod, "_write_dataset", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        render_dataset(out, n=5, size=SIZE, seed=1)
    assert _digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
