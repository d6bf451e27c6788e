import numpy as np
import pytest

from visionflow.tasks.classify import classification_metrics


def test_hand_computed_case():
    # 3 classes; true: a a b b c ; predicted: a b b b a
    probs = np.array([
        [0.7, 0.2, 0.1],
        [0.4, 0.5, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.6, 0.2],
        [0.5, 0.1, 0.4],
    ])
    m = classification_metrics(np.array([0, 0, 1, 1, 2]), probs, ["a", "b", "c"], k=2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # top-2: row 0 {a,b} ok, row 1 {b,a} ok, row 2 ok, row 3 ok, row 4 {a,c} ok
    assert m["top_k_accuracy"] == pytest.approx(1.0)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"]) == pytest.approx((0.5, 0.5))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_absent_class_does_not_count_in_macro_f1():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    m = classification_metrics(np.array([0, 1]), probs, ["a", "b", "c"], k=5)
    assert m["k"] == 3
    assert m["macro_f1"] == 1.0
    assert m["per_class"]["c"]["support"] == 0


def test_label_smoothing_is_torchs_smoothed_cross_entropy_and_zero_is_plain():
    import torch
    import torch.nn.functional as F

    from visionflow.core.config import TrainParams
    from visionflow.tasks.classify import ClassifyTask

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    model = torch.nn.Identity()
    targets = torch.tensor([0, 2])
    plain = ClassifyTask(TrainParams()).loss(model, logits, targets)["cross_entropy"]
    assert plain.item() == pytest.approx(F.cross_entropy(logits, targets).item())
    smooth = ClassifyTask(TrainParams(label_smoothing=0.1)).loss(model, logits, targets)["cross_entropy"]
    # by hand: (1 - e) * NLL of the label + e * mean NLL over the K classes
    logp = torch.log_softmax(logits, 1)
    want = (0.9 * -logp[torch.arange(2), targets] + 0.1 * -logp.mean(1)).mean()
    assert smooth.item() == pytest.approx(want.item(), rel=1e-6)
