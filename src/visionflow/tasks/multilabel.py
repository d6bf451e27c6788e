"""Multi-label image classification: an image may carry several classes at once.

An image's classes are its image-level labels and the categories of its (non-crowd) objects
(`image_classes`): COCO `labels` and instances, Label Studio multi-choice `choices`, YOLO or VOC
objects all give them. The model is one of the torchvision classifiers with K independent
sigmoid outputs, trained with binary cross-entropy; after training, one threshold per class is
chosen on the val split (the score that maximises the class's F1) and travels in meta.json.

Targets (B, K) float multi-hot, built in the loss from each sample's class ids.
Predictions (Task.predict), per image:
    {"labels": [int] the classes scoring >= their threshold, "scores": [float] theirs,
     "probs": [float] * K every class's sigmoid score}
Test metric: mAP over the classes present (primary, `map`), micro and macro F1, per-class
AP, precision, recall and F1 at the thresholds.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from visionflow.manifest import Category, Sample
from visionflow.training.loader import LoaderDataset, chw_tensor, stack
from visionflow.tasks.base import Normalize, TestScore, mean_std, nanmean_rows
from visionflow.tasks.classify import ClassifyTask

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # a class the val split has no example of keeps it


def image_classes(sample: Sample) -> list[int]:
    """The classes an image carries: its image-level labels and its objects' categories."""
    ids = set(sample.labels) | {inst.category_id for inst in sample.instances if not inst.iscrowd}
    return sorted(int(k) for k in ids)


class MultilabelDataset(LoaderDataset):
    """(image (3, S, S) float32 normalised, class ids); decoding and seeding: LoaderDataset."""

    def __init__(self, samples: Sequence[Sample], transform, project_root: Path, decode: str = "full"):
        super().__init__(samples, transform, project_root, decode)
        self.items = [(s.image_path(project_root), image_classes(s)) for s in samples]

    def raw(self, i: int, extras: bool = True) -> dict[str, np.ndarray]:
        return {"image": self.read(self.items[i][0])}

    def item(self, i: int, record: dict[str, np.ndarray], transform) -> tuple[torch.Tensor, list[int]]:
        image = transform(image=record["image"])["image"]  # (H, W, 3) float32, normalised
        return chw_tensor(image), self.items[i][1]


def multi_hot(classes: Sequence[Sequence[int]], k: int, device=None) -> torch.Tensor:
    """Per-image class ids -> (B, K) float 0/1."""
    target = torch.zeros((len(classes), k), dtype=torch.float32, device=device)
    for i, ids in enumerate(classes):
        if len(ids):
            target[i, list(ids)] = 1.0
    return target


# --- metrics -------------------------------------------------------------------------------

def weighted_ap(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision per class when image i counts weights[b, i] times.

    y (N, K) 0/1 truth, scores (N, K), weights (B, N) -> (B, K), NaN where a class has no
    positive. AP = sum over positives of precision at their rank / number of positives, images
    ranked by score (ties in image order). All weights 1 gives the plain AP."""
    B, K = len(weights), y.shape[1]
    out = np.full((B, K), np.nan)
    for k in range(K):
        order = np.argsort(-scores[:, k], kind="stable")
        yk = y[order, k].astype(float)  # (N,)
        w = weights[:, order]  # (B, N)
        tp, fp = np.cumsum(w * yk, axis=1), np.cumsum(w * (1 - yk), axis=1)
        positives = (w * yk).sum(1)  # (B,)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
            ap = (precision * w * yk).sum(1) / positives
        out[:, k] = np.where(positives > 0, ap, np.nan)
    return out


def multilabel_metrics(y: np.ndarray, scores: np.ndarray, predicted: np.ndarray,
                       names: list[str]) -> dict[str, Any]:
    """y, predicted (N, K) 0/1; scores (N, K) -> mAP, micro/macro F1 and per-class numbers."""
    ap = weighted_ap(y, scores, np.ones((1, len(y))))[0] if len(y) else np.full(len(names), np.nan)
    tp, fp, fn = ((y == a) & (predicted == b) for a, b in ((1, 1), (0, 1), (1, 0)))
    per_class = {}
    for k, name in enumerate(names):
        t, f_p, f_n = int(tp[:, k].sum()), int(fp[:, k].sum()), int(fn[:, k].sum())
        precision = t / (t + f_p) if t + f_p else 0.0
        recall = t / (t + f_n) if t + f_n else 0.0
        per_class[name] = {"ap": None if np.isnan(ap[k]) else float(ap[k]), "precision": precision,
                           "recall": recall, "f1": 2 * t / (2 * t + f_p + f_n) if t + f_p + f_n else 0.0,
                           "support": int(y[:, k].sum())}
    present = [v for v in per_class.values() if v["support"] > 0]
    T, FP, FN = int(tp.sum()), int(fp.sum()), int(fn.sum())
    return {"n": len(y), "map": float(np.nanmean(ap)) if present else 0.0,
            "micro_f1": 2 * T / (2 * T + FP + FN) if T + FP + FN else 0.0,
            "macro_f1": float(np.mean([v["f1"] for v in present])) if present else 0.0,
            "exact_match": float((y == predicted).all(1).mean()) if len(y) else 0.0,
            "per_class": per_class}


class MultilabelMetric:
    """mAP over classes (primary), F1 and per-class numbers; per image: its scores and truth,
    which the bootstrap re-weights (weighted_ap)."""

    def __init__(self, categories: Sequence[Category]):
        self.names = [c.name for c in categories]
        self.y: list[np.ndarray] = []
        self.scores: list[list[float]] = []
        self.predicted: list[np.ndarray] = []

    def process(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> None:
        k = len(self.names)
        for s, p in zip(samples, predictions, strict=True):
            classes = image_classes(s)  # none: an image that shows no class, a negative for every class
            truth, chosen = np.zeros(k, np.int8), np.zeros(k, np.int8)
            truth[classes] = 1
            chosen[list(p["labels"])] = 1
            self.y.append(truth)
            self.predicted.append(chosen)
            self.scores.append(list(p["probs"]))

    def compute(self) -> TestScore:
        k = len(self.names)
        y = np.stack(self.y) if self.y else np.zeros((0, k), np.int8)
        scores = np.asarray(self.scores, dtype=np.float64).reshape(len(y), k)
        predicted = np.stack(self.predicted) if self.predicted else np.zeros((0, k), np.int8)
        m = multilabel_metrics(y, scores, predicted, self.names)
        per_class = {n: v["ap"] for n, v in m["per_class"].items() if v["ap"] is not None}
        return TestScore("map", m["map"], per_class, "AP",
                         lambda w: nanmean_rows(weighted_ap(y, scores, w)), metrics=m)


def best_thresholds(y: np.ndarray, scores: np.ndarray) -> list[float]:
    """Per class, the score threshold that maximises F1 on (y, scores); DEFAULT_THRESHOLD for a
    class without positives. A threshold t predicts the class when score >= t."""
    out = []
    for k in range(y.shape[1]):
        yk, sk = y[:, k].astype(bool), scores[:, k]
        if not yk.any():
            out.append(DEFAULT_THRESHOLD)
            continue
        best, best_f1 = DEFAULT_THRESHOLD, -1.0
        for t in np.unique(sk):  # every distinct score is a candidate
            chosen = sk >= t
            tp = int((chosen & yk).sum())
            f1 = 2 * tp / (chosen.sum() + yk.sum())
            if f1 > best_f1:
                best, best_f1 = float(t), f1
        out.append(best)
    return out


# --- the task ------------------------------------------------------------------------------

class MultilabelTask(ClassifyTask):
    """A classifier's model, transforms and export graph, with multi-label data, loss,
    thresholds, metrics and records."""

    name = "multilabel"

    def fits(self, data) -> Optional[str]:
        return f"{data.multi_label} images carry several image-level classes" if data.multi_label else None
    primary_metric = "val_map"
    thresholds: Optional[list[float]] = None  # per class, from meta.json (configure)

    def build_dataset(self, samples, transform, project_root) -> Dataset:
        return MultilabelDataset(samples, transform, Path(project_root), self.decode_mode)

    def collate(self, batch: list) -> tuple[torch.Tensor, list[list[int]]]:
        images, classes = zip(*batch)
        return stack(images), list(classes)

    def loss(self, model, images, targets) -> dict[str, torch.Tensor]:
        logits = model(images)  # (B, K)
        return {"bce": F.binary_cross_entropy_with_logits(logits.float(), multi_hot(targets, logits.shape[1],
                                                                                     images.device))}

    @torch.no_grad()
    def _scores(self, model, loader, device) -> tuple[np.ndarray, np.ndarray, float]:
        """(truth (N, K), sigmoid scores (N, K), summed BCE) over a loader."""
        model.eval()
        ys, ss, loss_sum = [], [], 0.0
        for images, classes in loader:
            logits = model(images.to(device)).float()
            y = multi_hot(classes, logits.shape[1], logits.device)
            loss_sum += float(F.binary_cross_entropy_with_logits(logits, y, reduction="sum")) / logits.shape[1]
            ys.append(y.cpu().numpy())
            ss.append(logits.sigmoid().cpu().numpy())
        return np.concatenate(ys), np.concatenate(ss), loss_sum

    def val_metrics(self, model, loader, device) -> dict[str, float]:
        y, scores, loss_sum = self._scores(model, loader, device)
        ap = weighted_ap(y, scores, np.ones((1, len(y))))[0]
        return {"val_loss": loss_sum / max(len(y), 1),
                "val_map": float(np.nanmean(ap)) if not np.isnan(ap).all() else 0.0}

    def calibrate(self, model, val_loader, device) -> dict[str, Any]:
        """One threshold per class, chosen on the val split for the best F1."""
        if val_loader is None:
            log.warning("multilabel: no val split to choose thresholds on; every class uses %.2f", DEFAULT_THRESHOLD)
            return {}
        y, scores, _ = self._scores(model, val_loader, device)
        return {"thresholds": best_thresholds(y, scores)}

    def configure(self, meta: dict[str, Any]) -> None:
        k = int(meta["num_classes"])
        self.thresholds = [float(t) for t in meta.get("thresholds") or [DEFAULT_THRESHOLD] * k]

    def _chosen(self, probs: np.ndarray) -> list[list[int]]:
        thresholds = np.asarray(self.thresholds or [DEFAULT_THRESHOLD] * probs.shape[1])
        return [np.flatnonzero(p >= thresholds).tolist() for p in probs]

    def postprocess(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        """(B, K) logits -> predictions (ClassifyTask.predict batches the images)."""
        return self._predictions(logits.float().sigmoid().cpu().numpy())

    def _predictions(self, probs: np.ndarray) -> list[dict[str, Any]]:
        return [{"labels": chosen, "scores": [float(p[k]) for k in chosen], "probs": p.tolist()}
                for p, chosen in zip(probs, self._chosen(probs))]

    # --- the test metric and the evaluate stage ---
    def review_signal(self, sample: Sample, record: dict[str, Any], names: list[str], settings: Any):
        from visionflow.evaluation.review import multilabel_signal

        return multilabel_signal(image_classes(sample), record["probs"], names)

    def unlabelled(self, samples: Sequence[Sample]) -> list[str]:
        return []  # an image that shows no class is a negative for every class, not a gap

    def test_metric(self, categories: Sequence[Category], settings: Any = None) -> MultilabelMetric:
        return MultilabelMetric(categories)

    def report_test(self, params, paths, predictor, test: list[Sample], categories) -> dict[str, Any]:
        """mAP, micro/macro F1, per-class AP/precision/recall/F1 at the thresholds; one
        prediction per test image; the per-class plot and figure."""
        from visionflow.core.files import write_dir
        from visionflow.evaluation import figures
        from visionflow.evaluation.report import fmt, write_csv, write_evaluation, write_jsonl

        preds: list[dict[str, Any]] = []
        score = predictor.score(test, paths.root, categories, params, params.batch_size,
                                each=lambda _s, _i, p: preds.extend(p))
        m = score.metrics
        write_jsonl(paths.predictions, ({"id": s.id, "labels": p["labels"], "names": p["names"],
                                         "scores": p["scores"], "probs": p["probs"], "true": image_classes(s)}
                                        for s, p in zip(test, preds)))
        write_evaluation(paths, {"task": self.name, "primary_metric": score.name, **m,
                                        "thresholds": dict(zip(predictor.meta["classes"], self.thresholds or []))})
        write_csv(paths.per_class_csv, ["class", "ap", "precision", "recall", "f1", "support"],
                  ([n, fmt(v["ap"]), f"{v['precision']:.6f}", f"{v['recall']:.6f}", f"{v['f1']:.6f}", v["support"]]
                   for n, v in m["per_class"].items()))

        def draw(out: Path) -> None:
            figures.plot_per_class(m["per_class"], ("ap", "precision", "recall", "f1"),
                                   f"per-class metrics (test, n={m['n']}, mAP {m['map']:.3f})", out / "per_class.png")

        write_dir(paths.figures_dir, draw)
        log.info("test mAP %.4f, micro F1 %.4f, macro F1 %.4f on %d images", m["map"], m["micro_f1"],
                 m["macro_f1"], m["n"])
        return {"task": self.name, "test_images": m["n"], "map": round(m["map"], 4),
                "micro_f1": round(m["micro_f1"], 4), "macro_f1": round(m["macro_f1"], 4)}

    def eval_plots(self, p) -> list[Path]:
        return [p.per_class_csv]

    def plot_templates(self, p) -> list[tuple[Path, dict]]:
        return [(p.per_class_csv, {"template": "bar_horizontal", "x": "ap", "y": "class"})]

    def headline(self, ev: dict[str, Any]) -> str:
        return f"mAP {ev.get('map')}, micro F1 {ev.get('micro_f1')}, macro F1 {ev.get('macro_f1')}"

    def tracking_metrics(self, ev: dict[str, Any]) -> dict[str, float]:
        values = {f"test_{k}": ev[k] for k in ("map", "micro_f1", "macro_f1", "exact_match")}
        values.update({f"test_ap_{n}": v["ap"] for n, v in ev.get("per_class", {}).items() if v["ap"] is not None})
        return values

    # --- the FiftyOne face ---
    fiftyone_label = "classifications"
    jsonl_keys = ("id", "labels", "scores")  # + names, probs [K], true

    def image_classes(self, sample: Sample) -> list[int]:
        return image_classes(sample)

    def predicted_labels(self, record: dict[str, Any]) -> list[int]:
        return [int(v) for v in record["labels"]]

    # the relabel face: ClassifyTask's, several classes an image
    single_choice = False

    # --- the deploy face: the classes predicted, with names and scores ---
    pyfunc_columns = {"labels": "string", "names": "string", "scores": "string"}
    writes_csv, csv_columns = False, ()
    count_unit = "images with"
    object_unit = "labels"

    def objects(self, record: dict[str, Any]) -> int:
        return len(record["labels"])

    def nothing_found(self, meta: dict[str, Any], min_score: float, returned: int) -> str:
        return ("no class scored above its threshold on any image (per-class thresholds chosen on the val "
                "split when the model was trained: `thresholds` in its meta.json)")

    def record(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"labels": [int(v) for v in p["labels"]], "names": list(p["names"]),
                "scores": [round(float(v), 5) for v in p["scores"]]}

    def frame_columns(self, preds: list[dict[str, Any]]) -> dict[str, tuple[list, Any]]:
        rows = [self.record(p) for p in preds]  # JSON text cells: MLflow schemas have no nested lists
        return {k: ([json.dumps(r[k]) for r in rows], object) for k in self.pyfunc_columns}

    def from_frame_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {k: json.loads(row[k]) for k in self.pyfunc_columns}

    def coco_entries(self, image_id: int, where: dict[str, Any], rec: dict[str, Any],
                     classes: list[str]) -> list[dict[str, Any]]:
        """COCO-style image-level results: one entry per class predicted."""
        return [{"image_id": image_id, "category_id": k, "category_name": classes[k], "score": sc, **where}
                for k, sc in zip(rec["labels"], rec["scores"])]

    def count(self, record, counts, min_score: float, classes: list[str]) -> None:
        counts.update(record["names"])

    # --- the export face: sigmoid scores; thresholds applied after the graph, as predict does ---
    export_outputs = {"probs": "(B, K) float32 sigmoid scores, column k = classes[k]; the model's per-class "
                               "thresholds are in meta.json"}

    def export_graph(self, model: nn.Module, meta: dict[str, Any]) -> nn.Module:
        return SigmoidGraph(model, *mean_std(meta)).eval()

    def exported_predictions(self, outputs: dict[str, Any], sizes, image_size: int,
                             resize: str = "stretch") -> list[dict[str, Any]]:
        return self._predictions(np.asarray(outputs["probs"]))

    def agreement(self, reference: list[dict[str, Any]], exported: list[dict[str, Any]]) -> int:
        return sum(int(a["labels"] == b["labels"]) for a, b in zip(reference, exported))


class SigmoidGraph(nn.Module):
    """The exported multi-label classifier: 0..255 images -> (B, K) sigmoid scores."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.normalize, self.model = Normalize(mean, std), model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images)).sigmoid()  # (B, K)
