"""COCO bbox / segm evaluation: pycocotools' COCOeval numbers, computed with vectorised numpy.

`evaluate_coco(gt, dt, iou_type)` returns the twelve numbers of `COCOeval.summarize()` (AP, AP50,
AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl), per-class AP and the settings. The
semantics follow pycocotools 2.x (`cocoeval.py`, `coco.py: loadRes`) exactly, so the numbers
agree to float precision on any input pycocotools accepts:

- evaluated images are the ids in `gt["images"]`, categories those in `gt["categories"]`; GT
  annotations pointing elsewhere are dropped (as `getAnnIds` does);
- per (image, category) detections are sorted by score, descending, stably (file order breaks
  ties), and cut to 100;
- a GT is ignored when `iscrowd` is truthy (a GT `ignore` field is overwritten by pycocotools, so
  it is not read) or its `area` field lies outside the area range;
- detection area is `w * h` of its bbox when the FIRST detection has a non-empty `bbox` (loadRes
  then also gives box-polygon masks to detections without `segmentation`), else the mask area;
- IoU with a crowd GT is intersection / detection area; crowd GTs can be matched repeatedly;
- a match to a GT whose annotation id is 0 counts as unmatched in accumulation (pycocotools
  stores matches as GT ids and tests them against 0).

Differences, where pycocotools fails: detections with an image id not in the GT images or a
category id not in the GT categories are an error here (DataError) rather than an assertion or
a silent drop; an EMPTY detection list (pycocotools cannot load one) evaluates as "no
detections": AP/AR are 0 for categories with non-ignored GT and -1 where nothing is defined,
exactly what pycocotools gives when the only detections belong to no evaluated category.
A missing GT `iscrowd` counts as 0.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.core.errors import DataError, UserError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
# The COCOeval defaults, built the same way so the float values are identical.
IOU_THRS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)  # (T,)
REC_THRS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)  # (R,)
MAX_DETS = (1, 10, 100)
AREA_RANGES = {"all": (0 ** 2, 1e5 ** 2), "small": (0 ** 2, 32 ** 2),
               "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e5 ** 2)}
_AREA = np.array(list(AREA_RANGES.values()), dtype=float)  # (A, 2)


def evaluate_coco(gt: dict | str | Path, dt: list | str | Path, iou_type: str = "bbox", curves: bool = False) -> dict:
    """COCO AP/AR of detections `dt` (results list) against the dataset `gt` (dict or JSON path).

    curves=True adds "pr_curves": {class name: precision at each of the 101 recall thresholds
    ("recall_thresholds"), IoU 0.5, all areas, 100 detections; -1 where undefined}."""
    if iou_type not in IOU_TYPES:
        raise UserError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    gt, images, cat_ids, g, d, matched, dt_ignore = _load_and_match(gt, dt, iou_type)
    precision, recall = _accumulate(g, d, matched, dt_ignore, len(cat_ids))
    stats = _summarize(precision, recall)
    names = _category_names(gt, cat_ids)
    per_class = {names[k]: _mean_defined(precision[:, :, k, 0, -1]) for k in range(len(cat_ids))}
    extra = {}
    if curves:
        extra["recall_thresholds"] = [round(float(r), 2) for r in REC_THRS]
        extra["pr_curves"] = {names[k]: precision[0, :, k, 0, -1].tolist() for k in range(len(cat_ids))}
        extra["per_class_ap50"] = {names[k]: _mean_defined(precision[0, :, k, 0, -1]) for k in range(len(cat_ids))}
    return {**stats, "per_class": per_class, **extra, "settings": {
        "iou_type": iou_type, "max_dets": list(MAX_DETS),
        "area_ranges": {k: list(v) for k, v in AREA_RANGES.items()},
        "iou_thresholds": [round(float(t), 2) for t in IOU_THRS], "recall_thresholds": len(REC_THRS)}}


def _load_and_match(gt, dt, iou_type: str):
    """Read both files and match every detection (COCOeval.evaluate): the steps shared by the
    summary numbers and the per-detection table. Returns (gt dict, image table, category ids,
    g, d, matched (N_dt, A, T), ignored (N_dt, A, T))."""
    gt_file, gt = _load(gt, "<gt>", dict)
    dt_file, dt = _load(dt, "<dt>", list)
    images = _image_table(gt, gt_file)
    cat_ids = sorted({c["id"] for c in gt.get("categories", [])})
    g = _read_gt(gt, gt_file, images, cat_ids, iou_type)
    d = _read_dt(dt, dt_file, images, cat_ids, iou_type)
    matched, ignore = _match(g, d, iou_type)
    return gt, images, cat_ids, g, d, matched, ignore


def write_results(stats: dict, out_path: str | Path) -> None:
    from visionflow.core.files import write_json

    write_json(out_path, stats)


# ---------------------------------------------------------------------------------- reading

def _load(obj, label: str, kind: type):
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if not path.is_file():
            raise DataError(path, "file not found")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(path, f"invalid JSON: {exc}") from None
        label = str(path)
    if not isinstance(obj, kind):
        raise DataError(label, f"expected a JSON {'object' if kind is dict else 'array'}, got {type(obj).__name__}")
    return label, obj


def _image_table(gt: dict, file: str) -> dict:
    """image id -> (index in sorted id order, height, width)."""
    try:
        by_id = {img["id"]: img for img in gt.get("images", [])}
    except (KeyError, TypeError):
        raise DataError(file, "every entry of 'images' needs an 'id'") from None
    return {i: (n, by_id[i].get("height"), by_id[i].get("width")) for n, i in enumerate(sorted(by_id))}


def _category_names(gt: dict, cat_ids: list) -> list[str]:
    name = {c["id"]: str(c.get("name", c["id"])) for c in gt.get("categories", [])}
    names = [name[c] for c in cat_ids]
    return [f"{n} ({c})" if names.count(n) > 1 else n for n, c in zip(names, cat_ids)]


def _to_rle(segm, image: tuple, file: str, record: str):
    """pycocotools `COCO.annToRLE`: polygons (merged) and uncompressed RLE to compressed RLE."""
    from pycocotools import mask as mask_utils

    _, h, w = image
    try:
        if isinstance(segm, list):
            return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        if isinstance(segm["counts"], list):
            return mask_utils.frPyObjects(segm, h, w)
        return segm
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(file, f"unreadable segmentation ({exc!r}); polygons and RLE need the "
                        "image height and width", record=record) from None


def _read_gt(gt: dict, file: str, images: dict, cat_ids: list, iou_type: str) -> dict:
    """GT of evaluated images/categories, in file order: img/cat index, box (x, y, w, h), area, ..."""
    cat_index = {c: k for k, c in enumerate(cat_ids)}
    anns = gt.get("annotations", [])
    try:
        # pycocotools walks images in id order, loads annotations BY ID (a repeated id yields the
        # last annotation with it, which may sit elsewhere), then groups by image and category.
        last = {ann["id"]: ann for ann in anns}
        walk = sorted((images[a["image_id"]][0], n) for n, a in enumerate(anns)
                      if a["image_id"] in images and a["category_id"] in cat_index)
    except (KeyError, TypeError) as exc:
        raise DataError(file, f"every GT annotation needs 'id', 'image_id' and 'category_id' ({exc!r})") from None
    rows = []
    for _, n in walk:
        ann = last[anns[n]["id"]]
        try:
            img, cat = ann["image_id"], ann["category_id"]
            if img not in images or cat not in cat_index:
                continue
            crowd = ann.get("iscrowd", 0)
            rows.append((images[img][0], cat_index[cat], float(ann["area"]), int(crowd), bool(crowd),
                         ann["id"] != 0, _xywh(ann["bbox"]) if iou_type == "bbox" else None,
                         _to_rle(ann["segmentation"], images[img], file, f"annotation {ann.get('id')}")
                         if iou_type == "segm" else None))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(file, f"GT annotation lacks or has a bad {exc}", record=f"annotation #{n}") from None
    cols = list(zip(*rows)) if rows else [()] * 8
    return {"img": np.array(cols[0], dtype=np.int64), "cat": np.array(cols[1], dtype=np.int64),
            "area": np.array(cols[2], dtype=float), "crowd": np.array(cols[3], dtype=bool),
            "ignore": np.array(cols[4], dtype=bool), "id_nonzero": np.array(cols[5], dtype=bool),
            "box": np.array(cols[6], dtype=float).reshape(-1, 4) if iou_type == "bbox" else None,
            "rle": list(cols[7])}


def _xywh(box) -> list[float]:
    box = [float(v) for v in box]
    if len(box) != 4:
        raise ValueError("'bbox' (needs 4 numbers x, y, w, h)")
    return box


def _read_dt(dt: list, file: str, images: dict, cat_ids: list, iou_type: str) -> dict:
    """Detections kept for evaluation, sorted by (category, image, score desc, file order) and cut
    to MAX_DETS[-1] per image-category; `rank` is the position inside its image-category."""
    from pycocotools import mask as mask_utils

    cat_index = {c: k for k, c in enumerate(cat_ids)}
    box_area = bool(dt) and "bbox" in dt[0] and dt[0]["bbox"] != []  # loadRes decides on dt[0]
    fast = _dt_boxes(dt, images, cat_index) if box_area and iou_type == "bbox" else None
    img, cat, score, area, box, rle = fast or ([], [], [], [], [], [])
    for n, ann in enumerate(dt if fast is None else []):  # per detection: masks, or to name a bad one
        record = f"detection #{n}"
        try:
            if ann["image_id"] not in images:
                raise DataError(file, f"image id {ann['image_id']!r} is not in the GT images", record=record)
            if ann["category_id"] not in cat_index:
                raise DataError(file, f"category id {ann['category_id']!r} is not in the GT categories", record=record)
            image = images[ann["image_id"]]
            img.append(image[0])
            cat.append(cat_index[ann["category_id"]])
            score.append(float(ann["score"]))
            if box_area:
                x, y, w, h = ann["bbox"]
                area.append(w * h)
                if iou_type == "segm":
                    segm = ann["segmentation"] if "segmentation" in ann else [[x, y, x, y + h, x + w, y + h, x + w, y]]
                    rle.append(_to_rle(segm, image, file, record))
                else:
                    box.append(ann["bbox"])
            else:
                r = _to_rle(ann["segmentation"], image, file, record)
                area.append(float(mask_utils.area(r)))
                rle.append(r)
                if iou_type == "bbox":
                    box.append(ann["bbox"] if "bbox" in ann else mask_utils.toBbox(r))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(file, f"detection lacks or has a bad {exc}", record=record) from None
    img, cat, score = np.array(img, dtype=np.int64), np.array(cat, dtype=np.int64), np.array(score, dtype=float)
    n = len(score)
    order = np.lexsort((np.arange(n), -score, img, cat))  # unique keys: no stability needed
    gi, gc = img[order], cat[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (gi[1:] != gi[:-1]) | (gc[1:] != gc[:-1])
    starts = np.flatnonzero(new_group)
    rank = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    keep = order[rank < MAX_DETS[-1]]
    return {"img": img[keep], "cat": cat[keep], "score": score[keep], "rank": rank[rank < MAX_DETS[-1]],
            "area": np.array(area, dtype=float)[keep] if n else np.zeros(0),
            "box": np.array(box, dtype=float).reshape(-1, 4)[keep] if iou_type == "bbox" else None,
            "rle": [rle[i] for i in keep] if iou_type == "segm" else None}


def _dt_boxes(dt: list, images: dict, cat_index: dict):
    """The bbox columns of all detections at once; None when any is bad (the loop then names it)."""
    try:
        img = np.array([images[a["image_id"]][0] for a in dt], dtype=np.int64)
        cat = np.array([cat_index[a["category_id"]] for a in dt], dtype=np.int64)
        score = np.array([a["score"] for a in dt], dtype=float)
        box = np.array([a["bbox"] for a in dt], dtype=float)
    except (KeyError, TypeError, ValueError):
        return None
    if box.shape != (len(dt), 4):
        return None
    return img, cat, score, box[:, 2] * box[:, 3], box, []


# ---------------------------------------------------------------------------------- matching

def _box_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """maskApi.c `bbIou` with the same float operations in the same order. d (..., 4), g (..., 4)
    xywh, broadcastable; crowd like g[..., 0]. -> IoU (...)."""
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = w * h
    da, ga = d[..., 2] * d[..., 3], g[..., 2] * g[..., 3]
    union = np.where(crowd, da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _problems(g: dict, d: dict):
    """(image, category) pairs with both GT and detections: their GT and detection index ranges."""
    n_img = int(max(g["img"].max(initial=-1), d["img"].max(initial=-1))) + 1
    g_key, d_key = g["cat"] * n_img + g["img"], d["cat"] * n_img + d["img"]
    g_order = np.argsort(g_key, kind="stable")  # file order inside a pair, as getAnnIds gives
    keys = np.intersect1d(g_key, d_key)
    g_start = np.searchsorted(g_key[g_order], keys)
    g_count = np.searchsorted(g_key[g_order], keys, side="right") - g_start
    d_start = np.searchsorted(d_key, keys)  # detections are already sorted by (cat, img, rank)
    d_count = np.searchsorted(d_key, keys, side="right") - d_start
    return g_order, g_start, g_count, d_start, d_count


def _match(g: dict, d: dict, iou_type: str):
    """COCOeval.evaluateImg for every image, category and area range at once.

    Returns `matched` and `ignore`, both (N_dt, A, T) bool: a detection is a match (to a GT of
    nonzero id) / is ignored, per area range and IoU threshold."""
    A, T = len(_AREA), len(IOU_THRS)
    thr = np.minimum(IOU_THRS, 1 - 1e-10)
    g_out = (g["area"][:, None] < _AREA[:, 0]) | (g["area"][:, None] > _AREA[:, 1])  # (N_gt, A)
    g_ig = g["ignore"][:, None] | g_out
    matched = np.zeros((len(d["score"]), A, T), dtype=bool)
    ignore = np.zeros_like(matched)
    g_order, g_start, g_count, d_start, d_count = _problems(g, d)
    # Batch pairs whose GT count pads to the same power of two; longest detection lists first,
    # so at step j the pairs still running are a prefix.
    bucket = np.ceil(np.log2(np.maximum(g_count, 1))).astype(int)
    for b in np.unique(bucket):
        sel = np.flatnonzero(bucket == b)
        sel = sel[np.argsort(-d_count[sel], kind="stable")]
        G = 1 << int(b)
        gidx = g_start[sel, None] + np.arange(G)
        gvalid = np.arange(G) < g_count[sel, None]
        gidx = g_order[np.where(gvalid, gidx, g_start[sel, None])]  # (P, G) rows of g
        n_dets = d_count[sel]
        row_start = np.concatenate([[0], np.cumsum(n_dets)[:-1]])
        det = np.repeat(d_start[sel] - row_start, n_dets) + np.arange(n_dets.sum())  # rows of d
        owner = np.repeat(np.arange(len(sel)), n_dets)
        ious = _pair_ious(g, d, iou_type, det, owner, gidx, gvalid)  # (N_rows, G)
        ious[~gvalid[owner]] = -1.0
        ig = g_ig[gidx] & gvalid[..., None]                                  # (P, G, A)
        ig = ig.transpose(0, 2, 1)                                           # (P, A, G)
        crowd, nonzero = g["crowd"][gidx], g["id_nonzero"][gidx]             # (P, G)
        avail = np.broadcast_to(gvalid[:, None, None, :], (len(sel), A, T, G)).copy()
        active = np.searchsorted(-n_dets, -np.arange(n_dets.max()), side="left")  # pairs with D > j
        for j, n in enumerate(active):
            rows = row_start[:n] + j
            iou = ious[rows][:, None, None, :]                               # (n, 1, 1, G)
            ok = avail[:n] & (iou >= thr[:, None])                           # (n, A, T, G)
            igj = ig[:n, :, None, :]
            # A detection takes the best available regular GT; only when there is none, the best
            # ignored one (pycocotools walks GTs sorted ignore-last and breaks). Ties: last GT.
            m = _last_argmax(np.where(ok & ~igj, iou, -1.0))
            m = np.where(m >= 0, m, _last_argmax(np.where(ok & igj, iou, -1.0)))  # (n, A, T)
            hit, mc = m >= 0, np.maximum(m, 0)
            p_ix = np.arange(n)[:, None, None]
            a_ix = np.arange(A)[None, :, None]
            t_ix = np.arange(T)[None, None, :]
            out = det[rows]
            matched[out] = hit & nonzero[p_ix, mc]
            ignore[out] = hit & ig[p_ix, a_ix, mc]
            avail[p_ix, a_ix, t_ix, mc] &= ~(hit & ~crowd[p_ix, mc])
    # Unmatched detections (or matched to GT id 0) outside the area range are ignored.
    d_out = (d["area"][:, None] < _AREA[:, 0]) | (d["area"][:, None] > _AREA[:, 1])  # (N_dt, A)
    ignore |= ~matched & d_out[:, :, None]
    return matched, ignore


def _pair_ious(g: dict, d: dict, iou_type: str, det, owner, gidx, gvalid) -> np.ndarray:
    """IoU of detection row r (row `det[r]` of d, pair `owner[r]`) with its pair's padded GTs
    `gidx[owner[r]]`: (N_rows, G)."""
    if iou_type == "bbox":
        gi = gidx[owner]
        return _box_iou(d["box"][det][:, None, :], g["box"][gi], g["crowd"][gi])
    from pycocotools import mask as mask_utils

    out = np.full((len(det), gidx.shape[1]), -1.0)
    bounds = np.searchsorted(owner, np.arange(len(gidx) + 1))  # rows of a pair are contiguous
    for p, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        gs = gidx[p][gvalid[p]]
        out[s:e, :len(gs)] = mask_utils.iou([d["rle"][i] for i in det[s:e]], [g["rle"][i] for i in gs],
                                            [int(c) for c in g["crowd"][gs]])
    return out


def _last_argmax(val: np.ndarray) -> np.ndarray:
    """Index of the last maximum along the last axis, -1 where every value is negative."""
    G = val.shape[-1]
    i = G - 1 - np.argmax(val[..., ::-1], axis=-1)
    best = np.take_along_axis(val, i[..., None], axis=-1)[..., 0]
    return np.where(best >= 0, i, -1)


# ---------------------------------------------------------------------------------- accumulation

def _accumulate(g: dict, d: dict, matched, ignore, K: int):
    """COCOeval.accumulate: precision (T, R, K, A, M) and recall (T, K, A, M), -1 where undefined."""
    T, R, A, M = len(IOU_THRS), len(REC_THRS), len(_AREA), len(MAX_DETS)
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    g_out = (g["area"][:, None] < _AREA[:, 0]) | (g["area"][:, None] > _AREA[:, 1])
    regular = ~(g["ignore"][:, None] | g_out)                                # (N_gt, A)
    npig = np.zeros((K, A), dtype=np.int64)
    np.add.at(npig, g["cat"], regular)
    # pycocotools concatenates per image (id order), each by rank, then sorts by score stably.
    order = np.lexsort((d["rank"], d["img"], -d["score"], d["cat"]))
    cat_bounds = np.searchsorted(d["cat"][order], np.arange(K + 1))
    tps, fps = matched & ~ignore, ~matched & ~ignore                         # (N_dt, A, T)
    for k in range(K):
        live = np.flatnonzero(npig[k])  # area ranges with regular GT; the others stay -1
        if not len(live):
            continue
        n_pos = npig[k, live]
        # rc = tp / npig for an integer tp, so `rc < thr` is `tp < first_count[thr]`: the least count
        # whose quotient is >= thr, computed with the same float division.
        first_count = np.stack([np.searchsorted(np.arange(n + 1) / n, REC_THRS, side="left") for n in n_pos])
        idx_k = order[cat_bounds[k]:cat_bounds[k + 1]]
        for m, max_det in enumerate(MAX_DETS):
            idx = idx_k[d["rank"][idx_k] < max_det]
            nd = len(idx)
            if not nd:
                recall[:, k, live, m] = 0
                precision[:, :, k, live, m] = 0
                continue
            tp_n = np.cumsum(tps[idx][:, live].reshape(nd, -1), axis=0).T   # (A' * T, nd)
            tp, fp = tp_n.astype(float), np.cumsum(fps[idx][:, live].reshape(nd, -1), axis=0).T.astype(float)
            recall[:, k, live, m] = (tp[:, -1] / np.repeat(n_pos, T)).reshape(-1, T).T
            pr = tp / (fp + tp + np.spacing(1))
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]         # monotone from the right
            # searchsorted(rc, REC_THRS, 'left') of every row at once: rows offset apart on the
            # integer tp axis (exact), so one flat sorted array serves them all.
            rows = len(tp_n)
            stride = int(n_pos.max()) + 2
            offset = np.arange(rows)[:, None] * stride
            queries = np.repeat(first_count, T, axis=0) + offset               # (rows, R)
            inds = np.searchsorted((tp_n + offset).ravel(), queries.ravel()).reshape(rows, R) - np.arange(rows)[:, None] * nd
            q = np.where(inds < nd, np.take_along_axis(pr, np.minimum(inds, nd - 1), axis=1), 0)
            precision[:, :, k, live, m] = q.reshape(len(live), T, R).transpose(1, 2, 0)
    return precision, recall


def _mean_defined(s: np.ndarray) -> float:
    return float(np.mean(s[s > -1])) if (s > -1).any() else -1.0


def _summarize(precision, recall) -> dict:
    """COCOeval.summarize's twelve numbers from the same slices."""
    area_index = {name: i for i, name in enumerate(AREA_RANGES)}

    def pick(ap: bool, iou=None, area="all", max_dets=100):
        a, m = [area_index[area]], [MAX_DETS.index(max_dets)]
        s = precision if ap else recall
        if iou is not None:
            s = s[np.where(iou == IOU_THRS)[0]]
        s = s[:, :, :, a, m] if ap else s[:, :, a, m]
        return _mean_defined(s)

    values = [pick(True), pick(True, iou=.5), pick(True, iou=.75), pick(True, area="small"),
              pick(True, area="medium"), pick(True, area="large"), pick(False, max_dets=1),
              pick(False, max_dets=10), pick(False), pick(False, area="small"),
              pick(False, area="medium"), pick(False, area="large")]
    return dict(zip(STAT_NAMES, values))


# ---------------------------------------------------------------------------------- per-detection outcomes

def match_table(gt: dict | str | Path, dt: list | str | Path, iou_type: str = "bbox", iou: float = 0.5) -> dict:
    """Each evaluated detection's outcome at IoU `iou`, area range "all", 100 detections: the rows
    COCO's AP at that IoU is accumulated from. Matching is per image, so statistics that resample
    images (a bootstrap) weight these rows by image instead of matching again.

    Images are indexed 0..N-1 in GT image-id order, categories 0..K-1 in id order. Returns
    {"img", "cat", "rank" (position in its image-category by score), "score": (N_dt,),
     "tp", "fp": (N_dt,) bool (neither: ignored, e.g. matched to a crowd), "gt_img", "gt_cat": (N_gt,),
     "gt_regular": (N_gt,) bool (counts toward recall), "categories": [names], "images": N}."""
    t = np.flatnonzero(np.isclose(IOU_THRS, iou))
    if iou_type not in IOU_TYPES or not len(t):
        raise UserError(f"match_table: iou_type must be one of {IOU_TYPES} and iou one of "
                        f"{[round(float(v), 2) for v in IOU_THRS]}; got {iou_type!r}, {iou}")
    gt, images, cat_ids, g, d, matched, ignore = _load_and_match(gt, dt, iou_type)
    a, t = list(AREA_RANGES).index("all"), int(t[0])
    g_out = (g["area"] < _AREA[a, 0]) | (g["area"] > _AREA[a, 1])
    return {"img": d["img"], "cat": d["cat"], "rank": d["rank"], "score": d["score"],
            "tp": matched[:, a, t] & ~ignore[:, a, t], "fp": ~matched[:, a, t] & ~ignore[:, a, t],
            "gt_img": g["img"], "gt_cat": g["cat"], "gt_regular": ~(g["ignore"] | g_out),
            "categories": _category_names(gt, cat_ids), "images": len(images)}


def weighted_ap(table: dict, weights: np.ndarray) -> np.ndarray:
    """COCO AP at the IoU of `table` (evaluation.coco.match_table) per category when image i
    counts weights[b, i] times: (B, N_images) -> (B, K), NaN where a category has no regular GT.

    Matching is per image, so a resampled image set only re-weights the rows: this equals
    evaluate_coco on the resampled set (images repeated) up to the order of equal-score
    detections. All weights 1 gives evaluate_coco's per-class AP50 exactly."""
    B, K = len(weights), len(table["categories"])
    out = np.full((B, K), np.nan)
    order = np.lexsort((table["rank"], table["img"], -table["score"], table["cat"]))  # COCO's accumulate order
    bounds = np.searchsorted(table["cat"][order], np.arange(K + 1))
    for k in range(K):
        n_pos = weights[:, table["gt_img"][(table["gt_cat"] == k) & table["gt_regular"]]].sum(1)  # (B,)
        idx = order[bounds[k]:bounds[k + 1]]
        if not len(idx):  # ground truth but no detections
            out[n_pos > 0, k] = 0.0
            continue
        w = weights[:, table["img"][idx]]  # (B, n)
        tp = np.cumsum(w * table["tp"][idx], axis=1)
        fp = np.cumsum(w * table["fp"][idx], axis=1)
        pr = tp / (tp + fp + np.spacing(1))
        envelope = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # monotone from the right
        for b in np.flatnonzero(n_pos > 0):
            at = np.searchsorted(tp[b] / n_pos[b], REC_THRS, side="left")
            out[b, k] = np.where(at < len(idx), envelope[b, np.minimum(at, len(idx) - 1)], 0.0).mean()
    return out


def coco_block(stats: dict[str, Any]) -> dict[str, Any]:
    """evaluate_coco's numbers with the reference evaluator's settings (pycocotools COCOeval
    defaults), as the evaluate stage records them (the numbers in evaluate.json, the rest in its
    details file)."""
    return {**{k: stats[k] for k in STAT_NAMES}, "per_class_AP": stats["per_class"],
            **({"per_class_AP50": stats["per_class_ap50"]} if "per_class_ap50" in stats else {}),
            "evaluator": {"implementation": "visionflow.evaluation.coco (equals pycocotools COCOeval)",
                          "reference": "pycocotools.cocoeval.COCOeval", **stats["settings"]}}
