"""Evaluate stage: test-split metrics, per-sample predictions and plots."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.config import EvaluateParams
from visionflow.formats.images import load_rgb
from visionflow.io import atomic_path, write_dir, write_json, write_with
from visionflow.manifest import image_label, read_categories, read_manifest, samples_in_split
from visionflow.paths import Paths
from visionflow.tasks import load_predictor
from visionflow.tasks.classify import classification_metrics

log = logging.getLogger(__name__)


def evaluate(params: EvaluateParams, paths: Paths) -> dict[str, Any]:
    predictor = load_predictor(paths.model_dir)
    classes = predictor.meta["classes"]
    table = [c.name for c in read_categories(paths.categories)]
    if table != classes:
        raise ValueError(f"{paths.model_dir}: model classes {classes} differ from {paths.categories} {table}; re-run train")
    test = samples_in_split(read_manifest(paths.manifest), paths.split_file, "test")
    if not test:
        raise ValueError(f"{paths.split_file}: the test split is empty")

    preds: list[dict[str, Any]] = []
    for i in range(0, len(test), params.batch_size):
        chunk = test[i:i + params.batch_size]
        preds += predictor.predict([load_rgb(s.image_path(paths.root)) for s in chunk], batch_size=params.batch_size)
    y_true = np.array([image_label(s) for s in test])
    probs = np.array([p["probs"] for p in preds])
    metrics = classification_metrics(y_true, probs, classes, params.top_k)

    _write_predictions(paths.predictions, test, preds, y_true)
    write_json(paths.eval_metrics, {k: v for k, v in metrics.items() if k != "confusion_matrix"})
    _write_confusion_csv(paths.confusion_csv, y_true, probs.argmax(1), classes)
    _write_per_class_csv(paths.per_class_csv, metrics["per_class"])
    write_dir(paths.figures_dir, lambda d: _plot(d, metrics, classes))
    log.info("test accuracy %.4f, top-%d %.4f, macro F1 %.4f on %d images",
             metrics["accuracy"], metrics["k"], metrics["top_k_accuracy"], metrics["macro_f1"], metrics["n"])
    return {"test_images": metrics["n"], "accuracy": round(metrics["accuracy"], 4),
            "top_k_accuracy": round(metrics["top_k_accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4)}


def _write_predictions(path: Path, samples, preds, y_true) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for s, p, t in zip(samples, preds, y_true):
            fh.write(json.dumps({"id": s.id, "label": p["label"], "name": p["name"], "confidence": p["confidence"],
                                 "probs": p["probs"], "true": int(t)}) + "\n")


def _write_csv(path: Path, header: list[str], rows) -> None:
    def _w(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)

    write_with(path, _w)


def _write_confusion_csv(path: Path, y_true, y_pred, classes) -> None:
    # One row per test image: the layout DVC's confusion template expects.
    _write_csv(path, ["actual", "predicted"], ([classes[t], classes[p]] for t, p in zip(y_true, y_pred)))


def _write_per_class_csv(path: Path, per_class: dict) -> None:
    _write_csv(path, ["class", "precision", "recall", "f1", "support"],
               ([n, f"{v['precision']:.6f}", f"{v['recall']:.6f}", f"{v['f1']:.6f}", v["support"]] for n, v in per_class.items()))


def _plot(out: Path, metrics: dict, classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (r, c), v in np.ndenumerate(cm):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_title(f"confusion matrix (test, n={metrics['n']}, accuracy {metrics['accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)

    names = list(metrics["per_class"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4))
    for i, key in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (i - 1) * 0.27, [metrics["per_class"][n][key] for n in names], width=0.27, label=key)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    ax.set_title("per-class metrics (test)")
    fig.tight_layout()
    fig.savefig(out / "per_class.png", dpi=100)
    plt.close(fig)
