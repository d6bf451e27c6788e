"""Image classification: one class per image (visionflow.manifest.image_label)."""
from __future__ import annotations

import dataclasses

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from visionflow.training.augment import build_eval_transform, build_train_transform
from visionflow.training.loader import LoaderDataset, chw_tensor, stack
from visionflow.core.config import TrainParams
from visionflow.core.errors import DataError
from visionflow.manifest import Category, Sample, image_label
from visionflow.models.classifiers import build_classifier
from visionflow.tasks.base import Normalize, TaskBase, TestScore, eval_batch, mean_std

log = logging.getLogger(__name__)


class ClassificationDataset(LoaderDataset):
    """(image (3, S, S) float32 normalised, class id); decoding and seeding: LoaderDataset."""

    def __init__(self, samples: Sequence[Sample], transform, project_root: Path, decode: str = "full"):
        super().__init__(samples, transform, project_root, decode)
        self.items = [(s.image_path(project_root), image_label(s)) for s in samples]
        missing = [str(p) for p, y in self.items if y is None]
        if missing:
            raise ValueError(f"{len(missing)} samples have no class (no image label, no instance), e.g. {missing[:3]}")

    def raw(self, i: int, extras: bool = True) -> dict[str, np.ndarray]:
        return {"image": self.read(self.items[i][0])}

    def item(self, i: int, record: dict[str, np.ndarray], transform) -> tuple[torch.Tensor, int]:
        image = transform(image=record["image"])["image"]  # (H, W, 3) float32, normalised
        return chw_tensor(image), self.items[i][1]


class ClassifyMetric:
    """Accuracy (primary), top-k accuracy, per-class precision/recall/F1 and the confusion
    matrix; per image: correct or not (what the bootstrap resamples)."""

    def __init__(self, categories: Sequence[Category], top_k: int = 1):
        self.names, self.top_k = [c.name for c in categories], top_k
        self.y_true: list[int] = []
        self.probs: list[list[float]] = []

    def process(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> None:
        for s, p in zip(samples, predictions, strict=True):
            label = image_label(s)
            if label is None:
                raise DataError("test split", "sample has no class (no image label, no instance)", record=s.id,
                                hint="label it, or leave it out of the split")
            self.y_true.append(label)
            self.probs.append(list(p["probs"]))

    def compute(self) -> TestScore:
        y_true = np.asarray(self.y_true, dtype=np.int64)
        probs = np.asarray(self.probs, dtype=np.float64).reshape(len(y_true), len(self.names))  # (N, K)
        m = classification_metrics(y_true, probs, self.names, self.top_k)
        correct = (probs.argmax(1) == y_true).astype(float) if len(y_true) else np.zeros(0)  # (N,)
        per_class = {n: v["f1"] for n, v in m["per_class"].items() if v["support"] > 0}
        return TestScore("accuracy", m["accuracy"], per_class, "F1",
                         lambda w: w @ correct / max(len(correct), 1), metrics=m)


class ClassifyTask(TaskBase):
    name = "classify"

    def fits(self, data) -> Optional[str]:
        # one image-level class per image, on most images (others fall back to their largest object)
        if data.classes >= 2 and not data.multi_label and data.single_label * 2 >= data.images:
            return f"{data.single_label} of {data.images} images carry one image-level class"
        return None
    primary_metric = "val_accuracy"

    def eval_plots(self, p) -> list[Path]:
        return [p.confusion_csv, p.per_class_csv]

    # --- the FiftyOne face ---
    fiftyone_label = "classification"
    jsonl_keys = ("id", "label", "confidence")  # + name, probs [K], true

    def predicted_labels(self, record: dict[str, Any]) -> list[int]:
        return [int(record["label"])]

    # --- the deploy face (records) ---
    pyfunc_columns = {"label": "long", "name": "string", "confidence": "double"}
    writes_csv, csv_columns = True, ("label", "name", "confidence")

    def record(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"label": int(p["label"]), "name": str(p["name"]), "confidence": float(p["confidence"])}

    def frame_columns(self, preds: list[dict[str, Any]]) -> dict[str, tuple[list, Any]]:
        rows = [self.record(p) for p in preds]
        return {"label": ([r["label"] for r in rows], "int64"), "name": ([r["name"] for r in rows], object),
                "confidence": ([r["confidence"] for r in rows], "float64")}

    def from_frame_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.record(row)

    def count(self, record, counts, min_score: float, classes: list[str]) -> None:
        counts[record["name"]] += 1

    # --- the export face ---
    export_formats = ("onnx", "torchscript")
    export_outputs = {"probs": "(B, K) float32 softmax probabilities, column k = classes[k]"}

    def export_graph(self, model: nn.Module, meta: dict[str, Any]) -> nn.Module:
        return ProbabilitiesGraph(model, *mean_std(meta)).eval()

    def outputs_to_numpy(self, out: Any) -> dict[str, Any]:
        return {"probs": out.cpu().numpy()}

    def output_diff(self, ref: dict[str, Any], got: dict[str, Any]) -> tuple[float, int]:
        return float(np.abs(ref["probs"].astype(np.float64) - got["probs"]).max(initial=0.0)), 0

    def exported_predictions(self, outputs: dict[str, Any], sizes, image_size: int,
                             resize: str = "stretch") -> list[dict[str, Any]]:
        return [{"label": int(p.argmax()), "confidence": float(p.max()), "probs": p.tolist()}
                for p in outputs["probs"]]

    def reference_outputs(self, predictor, images: list[np.ndarray]):
        preds = predictor.predict(images, batch_size=max(1, len(images)))
        return {"probs": np.asarray([p["probs"] for p in preds], dtype=np.float32)}, preds

    def agreement(self, reference: list[dict[str, Any]], exported: list[dict[str, Any]]) -> int:
        return sum(int(a["label"] == b["label"]) for a, b in zip(reference, exported))

    def plot_templates(self, p) -> list[tuple[Path, dict]]:
        return [(p.confusion_csv, {"template": "confusion", "x": "actual", "y": "predicted"}),
                (p.per_class_csv, {"template": "bar_horizontal", "x": "f1", "y": "class"})]

    def headline(self, ev: dict[str, Any]) -> str:
        return (f"accuracy {ev.get('accuracy')}, top-k accuracy {ev.get('top_k_accuracy')}, "
                f"macro F1 {ev.get('macro_f1')}")

    def tracking_metrics(self, ev: dict[str, Any]) -> dict[str, float]:
        values = {"test_accuracy": ev["accuracy"], "test_top_k_accuracy": ev["top_k_accuracy"],
                  "test_macro_f1": ev["macro_f1"]}
        values.update({f"test_f1_{name}": stats["f1"] for name, stats in ev.get("per_class", {}).items()})
        return values

    def review_signal(self, sample: Sample, record: dict[str, Any], names: list[str], settings: Any):
        from visionflow.evaluation.review import classify_signal

        return classify_signal(image_label(sample), record["probs"], names)

    def embedding_module(self, model: nn.Module) -> tuple[nn.Module, bool]:
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
        return heads[-1], True  # the pooled features the head reads

    # --- the relabel face: the image's class ---
    relabel_controls = ("choice",)
    single_choice = True

    def label_view(self, sample: Sample) -> Sample:
        return dataclasses.replace(sample, instances=[], attributes={})

    def prediction_view(self, sample: Sample, record: dict[str, Any], settings: Any) -> Sample:
        return dataclasses.replace(sample, labels=self.predicted_labels(record), instances=[], attributes={})

    def apply_correction(self, sample: Sample, corrected: Sample) -> Sample:
        return dataclasses.replace(sample, labels=list(corrected.labels))

    def unlabelled(self, samples: Sequence[Sample]) -> list[str]:
        return [s.id for s in samples if image_label(s) is None]

    def test_metric(self, categories: Sequence[Category], settings: Any = None) -> ClassifyMetric:
        return ClassifyMetric(categories, getattr(settings, "top_k", 1))

    def report_test(self, params, paths, predictor, test: list[Sample], categories) -> dict[str, Any]:
        """The evaluate stage's outputs: accuracy, top-k, per-class precision/recall/F1 and the
        confusion matrix; one prediction per test image; the DVC confusion plot; figures."""
        from visionflow.evaluation import figures
        from visionflow.evaluation.report import write_csv, write_evaluation, write_jsonl
        from visionflow.core.files import write_dir

        classes = predictor.meta["classes"]
        preds: list[dict[str, Any]] = []
        score = predictor.score(test, paths.root, categories, params, params.batch_size,
                                each=lambda _s, _i, p: preds.extend(p))
        metrics = score.metrics
        y_true = [image_label(s) for s in test]
        write_jsonl(paths.predictions, ({"id": s.id, "label": p["label"], "name": p["name"],
                                         "confidence": p["confidence"], "probs": p["probs"], "true": int(t)}
                                        for s, p, t in zip(test, preds, y_true)))
        write_evaluation(paths, {"task": self.name, "primary_metric": score.name,
                                        **{k: v for k, v in metrics.items() if k != "confusion_matrix"}})
        # One row per test image: the layout DVC's confusion template expects.
        write_csv(paths.confusion_csv, ["actual", "predicted"], ([classes[t], p["name"]] for t, p in zip(y_true, preds)))
        write_csv(paths.per_class_csv, ["class", "precision", "recall", "f1", "support"],
                  ([n, f"{v['precision']:.6f}", f"{v['recall']:.6f}", f"{v['f1']:.6f}", v["support"]]
                   for n, v in metrics["per_class"].items()))

        def draw(out: Path) -> None:
            figures.plot_confusion(np.array(metrics["confusion_matrix"]), classes, classes,
                                   f"confusion matrix (test, n={metrics['n']}, accuracy {metrics['accuracy']:.3f})",
                                   out / "confusion_matrix.png")
            figures.plot_per_class(metrics["per_class"], ("precision", "recall", "f1"), "per-class metrics (test)",
                                   out / "per_class.png")

        write_dir(paths.figures_dir, draw)
        log.info("test accuracy %.4f, top-%d %.4f, macro F1 %.4f on %d images",
                 metrics["accuracy"], metrics["k"], metrics["top_k_accuracy"], metrics["macro_f1"], metrics["n"])
        return {"task": self.name, "test_images": metrics["n"], "accuracy": round(metrics["accuracy"], 4),
                "top_k_accuracy": round(metrics["top_k_accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4)}

    def build_model(self, params: TrainParams, num_classes: int, pretrained: bool = True) -> nn.Module:
        m = params.model
        return build_classifier(m.arch, num_classes, m.weights, m.mode, m.trainable_blocks, pretrained=pretrained,
                                width=m.width)

    def build_transforms(self, params: TrainParams):
        a = params.augment
        return (build_train_transform(a.preset, a.transforms, params.image_size),
                build_eval_transform(params.image_size))

    def build_dataset(self, samples, transform, project_root) -> Dataset:
        return ClassificationDataset(samples, transform, Path(project_root), self.decode_mode)

    def collate(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*batch)
        return stack(images), torch.tensor(labels, dtype=torch.int64)

    def loss(self, model, images, targets) -> dict[str, torch.Tensor]:
        smoothing = self.params.label_smoothing if self.params is not None else 0.0
        return {"cross_entropy": F.cross_entropy(model(images), targets.to(images.device), label_smoothing=smoothing)}

    @torch.no_grad()
    def predict(self, model, images: list[np.ndarray], transform, device) -> list[dict[str, Any]]:
        return self.postprocess(model(eval_batch(images, transform).to(device)))

    def postprocess(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        probs = logits.float().softmax(dim=1)  # (B, K)
        conf, label = probs.max(dim=1)
        return [{"label": int(l), "confidence": float(c), "probs": p.tolist()}
                for l, c, p in zip(label, conf, probs)]

    @torch.no_grad()
    def val_metrics(self, model, loader, device) -> dict[str, float]:
        model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(1) == targets).sum())
            n += len(targets)
        return {"val_loss": loss_sum / max(n, 1), "val_accuracy": correct / max(n, 1)}


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], k: int) -> dict[str, Any]:
    """Accuracy, top-k accuracy, per-class precision/recall/F1 and the confusion matrix.

    y_true (N,) int class ids; probs (N, K) class probabilities."""
    y_true = np.asarray(y_true, dtype=np.int64)
    num_classes = len(class_names)
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows: true, cols: predicted
    np.add.at(cm, (y_true, y_pred), 1)
    k = min(k, num_classes)
    topk = np.argsort(-probs, axis=1)[:, :k] if len(probs) else np.zeros((0, k), dtype=np.int64)
    per_class = {}
    for c, name in enumerate(class_names):
        tp = int(cm[c, c])
        predicted, support = int(cm[:, c].sum()), int(cm[c, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    present = [v for v in per_class.values() if v["support"] > 0]
    n = len(y_true)
    return {
        "n": n,
        "accuracy": float((y_pred == y_true).mean()) if n else 0.0,
        "top_k_accuracy": float((topk == y_true[:, None]).any(1).mean()) if n else 0.0,
        "k": k,
        "macro_f1": float(np.mean([v["f1"] for v in present])) if present else 0.0,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


class ProbabilitiesGraph(nn.Module):
    """The exported classifier: 0..255 images -> (B, K) softmax probabilities."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.normalize, self.model = Normalize(mean, std), model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images)).softmax(dim=1)  # (B, K)
