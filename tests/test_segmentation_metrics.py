"""Semantic-segmentation metrics: hand-computed cases, invariants and error paths."""
import numpy as np
import pytest
import torch

from visionflow.evaluation.segmentation import ConfusionAccumulator

IGN = 255
# 3 classes, one ignored pixel (bottom-left); its prediction (0) must not count.
TARGET = np.array([
    [0, 0, 1, 1],
    [0, 2, 2, 1],
    [IGN, 2, 2, 1],
])
PRED = np.array([
    [0, 1, 1, 1],
    [0, 2, 1, 1],
    [0, 2, 2, 2],
])


def _compute(pred, target, k=3):
    acc = ConfusionAccumulator(k, ignore_index=IGN)
    acc.update(pred, target)
    return acc.compute()


def test_hand_computed_case():
    m = _compute(PRED, TARGET)
    # (true, pred) pairs over the 11 valid pixels:
    #   true 0 -> pred 0,1,0          -> row [2, 1, 0]
    #   true 1 -> pred 1,1,1,2        -> row [0, 3, 1]
    #   true 2 -> pred 2,1,2,2        -> row [0, 1, 3]
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 3, 1], [0, 1, 3]]
    assert m["pixels"] == 11
    # class 0: TP=2 FP=0 FN=1 -> IoU 2/3, Dice 4/5, recall 2/3
    # class 1: TP=3 FP=2 FN=1 -> IoU 3/6, Dice 6/9, recall 3/4
    # class 2: TP=3 FP=1 FN=1 -> IoU 3/5, Dice 6/8, recall 3/4
    assert m["per_class_iou"] == pytest.approx([2 / 3, 1 / 2, 3 / 5])
    assert m["per_class_dice"] == pytest.approx([4 / 5, 2 / 3, 3 / 4])
    assert m["miou"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 5) / 3)  # 53/90
    assert m["dice"] == pytest.approx((4 / 5 + 2 / 3 + 3 / 4) / 3)  # 133/180
    assert m["pixel_accuracy"] == pytest.approx(8 / 11)
    assert m["mean_accuracy"] == pytest.approx((2 / 3 + 3 / 4 + 3 / 4) / 3)  # 13/18


def test_absent_class_excluded_and_predicted_only_class_scores_zero():
    # 4 classes: class 2 occurs nowhere, class 3 is only predicted (one false positive).
    target = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 3], [1, 1]])
    m = _compute(pred, target, k=4)
    # class 0: TP=1 FN=1 -> IoU 1/2, Dice 2/3, recall 1/2
    # class 1: TP=2      -> IoU 1,   Dice 1,   recall 1
    # class 2: union 0   -> None everywhere, not in any mean
    # class 3: TP=0 FP=1 -> IoU 0, Dice 0; not in the target, so not in mean_accuracy
    assert m["per_class_iou"] == [pytest.approx(0.5), 1.0, None, 0.0]
    assert m["per_class_dice"] == [pytest.approx(2 / 3), 1.0, None, 0.0]
    assert m["miou"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["dice"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["mean_accuracy"] == pytest.approx((0.5 + 1) / 2)
    assert m["pixel_accuracy"] == pytest.approx(3 / 4)


def test_absent_class_does_not_change_the_means():
    three, four = _compute(PRED, TARGET, k=3), _compute(PRED, TARGET, k=4)
    assert four["per_class_iou"][3] is None and four["per_class_dice"][3] is None
    for key in ("miou", "dice", "pixel_accuracy", "mean_accuracy"):
        assert four[key] == pytest.approx(three[key])


def test_predictions_on_ignored_pixels_change_nothing():
    other = PRED.copy()
    other[2, 0] = 2  # the ignored pixel
    assert _compute(other, TARGET) == _compute(PRED, TARGET)


def test_all_ignored_gives_zero_pixels_and_undefined_metrics():
    m = _compute(PRED, np.full_like(TARGET, IGN))
    assert m["pixels"] == 0
    assert m["confusion_matrix"] == [[0] * 3] * 3
    for key in ("miou", "dice", "pixel_accuracy", "mean_accuracy"):
        assert m[key] is None
    assert m["per_class_iou"] == m["per_class_dice"] == [None] * 3
    assert ConfusionAccumulator(3).compute() == m  # same as never updated


def _random_masks(seed, shape=(4, 16, 20), k=5):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, k, shape)
    target[rng.random(shape) < 0.1] = IGN
    # predictions right ~60% of the time so the matrix is not uniform
    pred = np.where(rng.random(shape) < 0.6, np.where(target == IGN, 0, target), rng.integers(0, k, shape))
    return pred, target


def test_batched_update_equals_sum_of_single_updates():
    pred, target = _random_masks(0)
    batched, single = ConfusionAccumulator(5), ConfusionAccumulator(5)
    batched.update(pred, target)
    for p, t in zip(pred, target):
        single.update(p, t)
    np.testing.assert_array_equal(batched.matrix, single.matrix)
    assert batched.compute() == single.compute()


def test_matrix_matches_a_per_pixel_count():
    pred, target = _random_masks(1)
    acc = ConfusionAccumulator(5)
    acc.update(pred, target)
    expected = np.zeros((5, 5), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != IGN:
            expected[t, p] += 1
    np.testing.assert_array_equal(acc.matrix, expected)


def test_torch_tensors_give_the_same_result_as_numpy():
    pred, target = _random_masks(2)
    acc = ConfusionAccumulator(5)
    acc.update(torch.from_numpy(pred), torch.from_numpy(target).to(torch.uint8))
    assert acc.compute() == _compute(pred, target, k=5)


def test_merge_equals_one_accumulator_over_all_data():
    (p1, t1), (p2, t2) = _random_masks(3), _random_masks(4)
    a, b, whole = ConfusionAccumulator(5), ConfusionAccumulator(5), ConfusionAccumulator(5)
    a.update(p1, t1)
    b.update(p2, t2)
    whole.update(np.concatenate([p1, p2]), np.concatenate([t1, t2]))
    assert a.merge(b).compute() == whole.compute()
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(ConfusionAccumulator(4))


def test_reset_clears_the_counts():
    acc = ConfusionAccumulator(3)
    acc.update(PRED, TARGET)
    acc.reset()
    assert acc.compute()["pixels"] == 0
    acc.update(PRED, TARGET)
    assert acc.compute() == _compute(PRED, TARGET)


@pytest.mark.parametrize("bad", [3, -1, 7])
def test_invalid_predictions_raise_naming_the_values(bad):
    pred = PRED.copy()
    pred[0, 0] = bad
    acc = ConfusionAccumulator(3)
    with pytest.raises(ValueError, match=rf"outside \[0, 3\): \[{bad}\]"):
        acc.update(pred, TARGET)
    assert acc.compute()["pixels"] == 0  # a rejected batch leaves no partial counts


def test_invalid_inputs_raise():
    acc = ConfusionAccumulator(3)
    target = TARGET.copy()
    target[0, 0] = 9
    with pytest.raises(ValueError, match=r"target ids .*\[9\]"):
        acc.update(PRED, target)
    with pytest.raises(ValueError, match="shape"):
        acc.update(PRED[:2], TARGET)
    with pytest.raises(ValueError, match="integer"):
        acc.update(PRED.astype(float), TARGET)


def test_agrees_with_torchmetrics_when_every_class_is_present():
    tm = pytest.importorskip("torchmetrics.classification")
    pred, target = _random_masks(5)
    ours = _compute(pred, target, k=5)
    assert all(v is not None for v in ours["per_class_iou"])
    jaccard = tm.MulticlassJaccardIndex(num_classes=5, average="macro", ignore_index=IGN)
    theirs = jaccard(torch.from_numpy(pred), torch.from_numpy(target))
    assert ours["miou"] == pytest.approx(float(theirs), abs=1e-6)
