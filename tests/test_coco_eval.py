"""`visionflow.evaluation.coco` against pycocotools' COCOeval on generated cases: all twelve
numbers and per-class AP must agree to 1e-9."""
import contextlib
import copy
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visionflow.core.errors import DataError
from visionflow.evaluation.coco import STAT_NAMES, evaluate_coco

H, W = 160, 200


def reference(gt: dict, dt: list, iou_type: str) -> COCOeval:
    """pycocotools on deep copies (loadRes and _prepare mutate annotations), stdout silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dt)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def assert_same(gt: dict, dt: list, iou_type: str, ref_dt: list | None = None) -> dict:
    ours = evaluate_coco(gt, dt, iou_type)
    ev = reference(gt, dt if ref_dt is None else ref_dt, iou_type)
    for i, name in enumerate(STAT_NAMES):
        assert abs(ours[name] - ev.stats[i]) <= 1e-9, (name, ours[name], ev.stats[i])
    names = {c["id"]: c["name"] for c in gt["categories"]}
    for k, cat_id in enumerate(ev.params.catIds):
        s = ev.eval["precision"][:, :, k, 0, -1]
        expected = float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
        assert abs(ours["per_class"][names[cat_id]] - expected) <= 1e-9, names[cat_id]
    return ours


def _polygon(x, y, w, h, rng):
    """An octagon-ish polygon inside the box (a mask that is not the box)."""
    cx, cy = x + w / 2, y + h / 2
    ang = np.sort(rng.uniform(0, 2 * np.pi, 8))
    r = rng.uniform(0.6, 1.0, 8)
    pts = np.stack([cx + r * np.cos(ang) * w / 2, cy + r * np.sin(ang) * h / 2], 1)
    return [pts.ravel().round(2).tolist()]


def _rle(polys, compressed: bool):
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, H, W))
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode()}
    m = mask_utils.decode(rle).ravel(order="F")
    runs, cur, n = [], 0, 0
    for v in m:  # uncompressed RLE: run lengths starting with zeros
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return {"size": [H, W], "counts": runs}


def make_case(seed, n_img=24, n_cat=5, gt_per=6, dt_per=30, crowd=0.1, segm=False, dt_bbox=True,
              many_dets_image=True):
    """Non-contiguous image and category ids; some images without GT, some without detections;
    GT areas that differ from box areas; scores rounded (ties); one image with > 100 detections;
    detections that are jittered GT plus background noise, all sizes (small/medium/large)."""
    rng = np.random.default_rng(seed)
    images = [{"id": int(i) * 7 + 3, "height": H, "width": W} for i in rng.permutation(n_img)]
    cats = [{"id": c * 11 + 5, "name": f"cat{c}"} for c in range(n_cat)]
    anns, dets = [], []

    def box():
        w, h = np.exp(rng.uniform(np.log(3), np.log(150), 2))
        return [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), float(w), float(h)]

    for n, im in enumerate(images):
        n_gt = 0 if n % 6 == 0 else int(rng.integers(1, gt_per + 1))
        for _ in range(n_gt):
            b, cid = box(), cats[rng.integers(n_cat)]["id"]
            is_crowd = int(rng.random() < crowd)
            ann = {"id": len(anns) + 1, "image_id": im["id"], "category_id": cid, "bbox": b,
                   "area": b[2] * b[3] * float(rng.uniform(0.5, 1.2)), "iscrowd": is_crowd}
            poly = _polygon(*b, rng)
            if segm:
                kind = rng.integers(3)
                ann["segmentation"] = (_rle(poly, compressed=False) if is_crowd else
                                       poly if kind < 2 else _rle(poly, compressed=True))
            anns.append(ann)
            if n % 6 != 3:
                for _ in range(int(rng.integers(0, 4))):  # jittered copies: true and duplicate matches
                    jb = [b[0] + rng.normal(0, b[2] * 0.1), b[1] + rng.normal(0, b[3] * 0.1),
                          b[2] * rng.uniform(0.8, 1.25), b[3] * rng.uniform(0.8, 1.25)]
                    dcid = cid if rng.random() < 0.85 else cats[rng.integers(n_cat)]["id"]
                    shifted = [(np.array(poly[0]) + rng.normal(0, 1.5, len(poly[0]))).round(2).tolist()]
                    dets.append(_det(im["id"], dcid, jb, rng, segm, dt_bbox, shifted))
        if n % 6 == 3:
            continue  # an image without detections
        n_noise = 130 if (many_dets_image and n == 1) else int(rng.integers(0, dt_per))
        for _ in range(n_noise):
            dets.append(_det(im["id"], cats[rng.integers(n_cat)]["id"], box(), rng, segm, dt_bbox))
    rng.shuffle(dets)
    return {"images": images, "categories": cats, "annotations": anns}, dets


def _det(image_id, cat_id, b, rng, segm, dt_bbox, poly=None):
    b = [float(v) for v in b]
    d = {"image_id": image_id, "category_id": cat_id, "score": float(np.round(rng.random(), 1))}
    if not segm or dt_bbox:
        d["bbox"] = b
    if segm:
        d["segmentation"] = _rle(poly or _polygon(*b, rng), compressed=True)
    return d


@pytest.mark.parametrize("seed", range(4))
def test_random_boxes_match_pycocotools(seed):
    gt, dt = make_case(seed)
    ours = assert_same(gt, dt, "bbox")
    assert 0.05 < ours["AP50"] < 1  # the case is not degenerate
    assert list(ours)[:12] == list(STAT_NAMES)


def test_crowds_bbox_and_many_detections():
    gt, dt = make_case(10, n_img=12, crowd=0.4, dt_per=120, gt_per=10)
    assert_same(gt, dt, "bbox")


@pytest.mark.parametrize("seed,dt_bbox", [(20, True), (21, False), (22, True)])
def test_segm_polygons_rle_and_crowds_match_pycocotools(seed, dt_bbox):
    # dt_bbox=False: detections carry only masks, so pycocotools takes the mask area as the
    # detection area; with a bbox it takes w*h of the box (loadRes looks at the first one).
    gt, dt = make_case(seed, n_img=14, crowd=0.25, segm=True, dt_bbox=dt_bbox, dt_per=12)
    ours = assert_same(gt, dt, "segm")
    assert ours["AP50"] > 0.05


def test_box_only_detections_in_segm_get_box_masks():
    gt, dt = make_case(23, n_img=8, segm=True, dt_per=8)
    for d in dt[::2]:
        del d["segmentation"]
    assert_same(gt, dt, "segm")


def test_categories_without_detections_or_without_gt():
    gt, dt = make_case(30, n_cat=4)
    gt["categories"].append({"id": 999, "name": "no_gt"})
    dt += [{"image_id": gt["images"][0]["id"], "category_id": 999, "bbox": [1, 2, 30, 40], "score": 0.9}]
    dt = [d for d in dt if d["category_id"] != gt["categories"][0]["id"]]  # GT but no detections
    ours = assert_same(gt, dt, "bbox")
    assert ours["per_class"]["no_gt"] == -1
    assert ours["per_class"]["cat0"] == 0


def test_gt_with_annotation_id_zero_counts_as_unmatched_like_pycocotools():
    gt, dt = make_case(31, n_img=6)
    for ann in gt["annotations"]:
        ann["id"] -= 1  # ids from 0
    assert_same(gt, dt, "bbox")


def test_exact_threshold_ious_and_identical_boxes():
    gt = {"images": [{"id": 1, "height": 100, "width": 100}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0}]}
    dt = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 0.5}
          for b in ([0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 7.5], [0, 0, 10, 10])]
    assert_same(gt, dt, "bbox")


def test_empty_detection_list_is_no_detections():
    """pycocotools cannot load []; one detection of a category outside the GT is the same thing."""
    gt, _ = make_case(40, n_img=6)
    ref_dt = [{"image_id": gt["images"][0]["id"], "category_id": 123456, "bbox": [0, 0, 5, 5], "score": 1.0}]
    ours = assert_same(gt, [], "bbox", ref_dt=ref_dt)
    assert ours["AP"] == 0 and ours["AR100"] == 0


def test_no_images_gives_minus_one():
    ours = evaluate_coco({"images": [], "categories": [{"id": 1, "name": "a"}], "annotations": []}, [], "bbox")
    assert all(ours[k] == -1 for k in STAT_NAMES)


def test_bad_inputs_name_the_file(tmp_path):
    gt, dt = make_case(50, n_img=4)
    with pytest.raises(DataError, match="image id"):
        evaluate_coco(gt, [{**dt[0], "image_id": 424242}], "bbox")
    with pytest.raises(DataError, match="category id"):
        evaluate_coco(gt, [{**dt[0], "category_id": 424242}], "bbox")
    bad = tmp_path / "dt.json"
    bad.write_text("[{")
    with pytest.raises(DataError, match="dt.json.*invalid JSON"):
        evaluate_coco(gt, bad, "bbox")
    with pytest.raises(DataError, match="missing.json"):
        evaluate_coco(tmp_path / "missing.json", [], "bbox")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "visionflow.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_the_twelve_numbers_and_writes_json(tmp_path):
    gt, dt = make_case(60, n_img=8)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    out = tmp_path / "out" / "coco.json"
    res = _cli("evaluate", "coco", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json"),
               "--iou-type", "bbox", "--out", str(out))
    assert res.returncode == 0, res.stderr
    printed = dict(line.split() for line in res.stdout.splitlines()[:12])
    assert list(printed) == list(STAT_NAMES)
    written = json.loads(out.read_text())
    ev = reference(gt, dt, "bbox")
    for i, name in enumerate(STAT_NAMES):
        assert abs(written[name] - ev.stats[i]) <= 1e-9
        assert printed[name] == f"{written[name]:.3f}"
    assert set(written["per_class"]) == {c["name"] for c in gt["categories"]}
    assert written["settings"]["iou_type"] == "bbox"

    (tmp_path / "bad.json").write_text(json.dumps([{**dt[0], "image_id": 999999}]))
    res = _cli("evaluate", "coco", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "bad.json"))
    assert res.returncode == 2 and "bad.json" in res.stderr and "Traceback" not in res.stderr


def test_grid_boxes_exact_iou_ties_and_tied_scores():
    """Integer boxes on a 5 px grid: IoUs of exactly 0.5 / 0.75, equal IoUs with several GTs
    (pycocotools takes the last), many equal scores, crowds."""
    for seed in range(25):
        rng = np.random.default_rng(seed)
        imgs = [{"id": i * 2, "height": 50, "width": 50} for i in range(int(rng.integers(1, 5)))]
        cats = [{"id": c, "name": str(c)} for c in (3, 8)]

        def box():
            return [int(v) for v in rng.integers(0, 4, 2) * 5] + [int(v) for v in rng.integers(1, 4, 2) * 10]

        anns = [{"id": n + 1, "image_id": im["id"], "category_id": int(rng.choice([3, 8])), "bbox": b,
                 "area": b[2] * b[3], "iscrowd": int(rng.random() < 0.2)}
                for n, (im, b) in enumerate((im, box()) for im in imgs for _ in range(int(rng.integers(0, 8))))]
        dets = [{"image_id": im["id"], "category_id": int(rng.choice([3, 8])), "bbox": box(),
                 "score": float(rng.integers(0, 3)) / 2} for im in imgs for _ in range(int(rng.integers(0, 30)))]
        if dets:
            assert_same({"images": imgs, "categories": cats, "annotations": anns}, dets, "bbox")


def test_repeated_gt_annotation_ids_resolve_like_pycocotools():
    """pycocotools loads GT by id: a repeated id stands for the last annotation carrying it."""
    gt, dt = make_case(70, n_img=10)
    anns = gt["annotations"]
    for i in range(0, len(anns) - 5, 5):
        anns[i]["id"] = anns[i + 3]["id"]
    assert_same(gt, dt, "bbox")
