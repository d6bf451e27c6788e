"""The multi-label task: its metric against hand-computed values and torchmetrics, the
bootstrap's resampling, the per-class thresholds, and the task's pieces on real shapes images.
Its whole branch (train, evaluate, register, inspect, the gate with ONNX parity) runs in
tests/test_e2e_flow.py."""
import numpy as np
import pytest
import torch

from visionflow.core.config import TrainParams
from visionflow.manifest import Category, Instance, Sample
from visionflow.tasks import get_task
from visionflow.tasks.multilabel import (DEFAULT_THRESHOLD, MultilabelMetric, best_thresholds, image_classes,
                                         multilabel_metrics, weighted_ap)

NAMES = ["a", "b", "c"]


def _sample(i: int, labels=(), objects=(), crowd=()) -> Sample:
    instances = [Instance(bbox=[0, 0, 4, 4], category_id=k) for k in objects]
    instances += [Instance(bbox=[0, 0, 4, 4], category_id=k, iscrowd=True) for k in crowd]
    return Sample(id=f"s/{i}", root="", path=f"{i}.png", width=8, height=8, sha256="", labels=list(labels),
                  instances=instances)


def test_image_classes_are_labels_and_object_categories_without_crowds():
    assert image_classes(_sample(0, labels=[2], objects=[0, 0, 1], crowd=[2])) == [0, 1, 2]
    assert image_classes(_sample(1, objects=[1], crowd=[0])) == [1]
    assert image_classes(_sample(2)) == []


def test_average_precision_by_hand():
    # ranked by score: pos, neg, pos, neg -> precision at the positives 1 and 2/3
    y = np.array([[1], [0], [1], [0]])
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    assert weighted_ap(y, scores, np.ones((1, 4)))[0, 0] == pytest.approx((1 + 2 / 3) / 2)
    # image 0 counted twice, image 2 not at all: pos(x2), neg -> AP 1
    assert weighted_ap(y, scores, np.array([[2.0, 1, 0, 1]]))[0, 0] == pytest.approx(1.0)
    assert np.isnan(weighted_ap(np.zeros((3, 1)), np.ones((3, 1)), np.ones((1, 3)))[0, 0])  # no positive


def test_metrics_match_torchmetrics():
    from torchmetrics.functional.classification import multilabel_average_precision, multilabel_f1_score

    rng = np.random.default_rng(0)
    y = (rng.random((40, 3)) < 0.4).astype(int)
    scores = np.clip(y * 0.3 + rng.random((40, 3)) * 0.7, 0, 1)  # informative, no ties
    predicted = (scores >= 0.5).astype(int)
    m = multilabel_metrics(y, scores, predicted, NAMES)
    t_scores, t_y = torch.from_numpy(scores), torch.from_numpy(y)
    ap = multilabel_average_precision(t_scores, t_y, num_labels=3, average=None).numpy()
    # torchmetrics computes in float32
    assert [m["per_class"][n]["ap"] for n in NAMES] == pytest.approx(ap.tolist(), abs=1e-6)
    assert m["map"] == pytest.approx(float(ap.mean()), abs=1e-6)
    assert m["micro_f1"] == pytest.approx(float(multilabel_f1_score(t_scores, t_y, num_labels=3, average="micro")))
    assert m["macro_f1"] == pytest.approx(float(multilabel_f1_score(t_scores, t_y, num_labels=3, average="macro")))


def test_streaming_metric_resamples_to_its_point_estimate():
    metric = MultilabelMetric([Category(k, n) for k, n in enumerate(NAMES)])
    samples = [_sample(0, objects=[0, 1]), _sample(1, objects=[1]), _sample(2, labels=[2]), _sample(3, objects=[0])]
    probs = [[0.9, 0.8, 0.1], [0.3, 0.7, 0.2], [0.2, 0.1, 0.6], [0.4, 0.6, 0.3]]
    metric.process(samples[:2], [{"labels": [0, 1], "probs": probs[0]}, {"labels": [1], "probs": probs[1]}])
    metric.process(samples[2:], [{"labels": [2], "probs": probs[2]}, {"labels": [1], "probs": probs[3]}])
    score = metric.compute()
    assert score.name == "map" and score.per_class_name == "AP"
    assert score.resample(np.ones((1, 4)))[0] == pytest.approx(score.value, abs=1e-12)
    # class a: positives at ranks 1 (0.9) and 2 (0.4); b: 0.8 pos, 0.7 pos, 0.6 neg; c: 0.6 pos
    assert score.per_class == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    assert score.metrics["per_class"]["a"]["recall"] == 0.5  # image 3's a was not predicted
    assert score.metrics["exact_match"] == 0.75


def test_best_thresholds_maximise_f1_per_class():
    y = np.array([[1, 0], [1, 0], [0, 0], [0, 0]])
    scores = np.array([[0.9, 0.2], [0.6, 0.9], [0.55, 0.1], [0.2, 0.3]])
    assert best_thresholds(y, scores) == [pytest.approx(0.6), DEFAULT_THRESHOLD]  # no b in this split


def test_task_trains_predicts_and_exports_with_thresholds(tmp_path):
    from visionflow.datasets.synth import render_dataset
    from visionflow.formats.coco import read_coco

    render_dataset(tmp_path / "shapes", n=4, size=64)
    data = read_coco(tmp_path / "shapes", tmp_path / "shapes" / "annotations.json", "shapes")
    index = {c.id: k for k, c in enumerate(data.categories)}
    for s in data.samples:  # source ids -> 0..K-1, as ingest does
        s.labels = [index[k] for k in s.labels]
        for inst in s.instances:
            inst.category_id = index[inst.category_id]
    k = len(data.categories)
    params = TrainParams(image_size=32, augment={"preset": "none"})
    task = get_task("multilabel", params)
    train_tf, eval_tf = task.build_transforms(params)
    images, classes = task.collate([task.build_dataset(data.samples, train_tf, tmp_path)[i] for i in range(4)])
    assert images.shape == (4, 3, 32, 32) and classes == [image_classes(s) for s in data.samples]
    assert any(len(c) > 1 for c in classes)  # the shapes set has several classes per image
    torch.manual_seed(0)
    model = task.build_model(params, k, pretrained=False)
    loss = task.loss(model, images, classes)["bce"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    task.configure({"num_classes": k, "thresholds": [0.0] * k})  # every class predicted
    [pred] = task.predict(model.eval(), [np.zeros((50, 70, 3), np.uint8)], eval_tf, torch.device("cpu"))
    assert pred["labels"] == list(range(k)) and len(pred["probs"]) == k and pred["scores"] == pred["probs"]
    task.configure({"num_classes": k, "thresholds": [1.01] * k})  # none predicted
    assert task.predict(model, [np.zeros((50, 70, 3), np.uint8)], eval_tf, torch.device("cpu"))[0]["labels"] == []
    graph = task.export_graph(model, {"image_size": 32})
    with torch.no_grad():
        out = task.outputs_to_numpy(graph(torch.full((2, 3, 32, 32), 128.0)))
    assert out["probs"].shape == (2, k) and ((out["probs"] > 0) & (out["probs"] < 1)).all()
