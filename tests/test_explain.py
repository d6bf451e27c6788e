"""What the network sees (visionflow.evaluation.explain, `visionflow explain`).

Classify: a tiny ResNet-18 trained in a few seconds on "red square on the left / on the right /
no square" (the third class makes both sides positive evidence: with left vs right alone the
network can learn one side and call everything else the other); the CAM of the predicted class
must put most of its mass on the square's side. Segment: a tiny U-Net trained to segment a red
square; the CAM of the class region must lie mostly inside the square. Detect: no detector
trains in seconds here, so the test checks that the CAM is kept to the predicted boxes of the
chosen class (a real detector's backbone, fixed detections), mapped to the image's pixels, and
that a real detector folder runs through `visionflow explain`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionflow.cli import main
from visionflow.core.config import TrainParams
from visionflow.deploy.predictor import ModelPredictor
from visionflow.evaluation.explain import explain, in_boxes
from visionflow.tasks import get_task
from visionflow.training.augment import IMAGENET_MEAN, IMAGENET_STD

SIZE = 64


def squares(n: int, seed: int, size: int = SIZE, classes: int = 3) -> tuple[list[np.ndarray], list[int], list[np.ndarray]]:
    """Noisy dark images with a red square (size / 4) in the left half (class 0), the right half
    (class 1) or nowhere (class 2); returns images, classes, square masks."""
    rng = np.random.default_rng(seed)
    images, ys, masks = [], [], []
    for i in range(n):
        y = i % classes
        im = (np.full((size, size, 3), 40) + rng.integers(0, 30, (size, size, 3))).astype(np.uint8)
        s = size // 4
        r = int(rng.integers(0, size - s))
        c = int(rng.integers(0, size // 2 - s)) + (size // 2 if y == 1 else 0) if classes == 3 else \
            int(rng.integers(0, size - s))
        mask = np.zeros((size, size), bool)
        if y < 2 or classes != 3:
            im[r:r + s, c:c + s] = (220, 20, 20)
            mask[r:r + s, c:c + s] = True
        images.append(im)
        ys.append(y)
        masks.append(mask)
    return images, ys, masks


def write_model(folder: Path, task: str, params: TrainParams, model: torch.nn.Module, classes: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    meta = {"task": task, "arch": params.model.arch, "num_classes": len(classes), "classes": classes,
            "image_size": params.image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "params": params.model_dump(mode="json")}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def train(task_name: str, params: TrainParams, k: int, images, targets, epochs: int, optimizer, loss_fn):
    from visionflow.evaluation.explain import model_input

    torch.manual_seed(0)
    task = get_task(task_name)
    model = task.build_model(params, k, pretrained=False)
    x = model_input(images, task.build_transforms(params)[1])
    y = torch.as_tensor(np.stack(targets))
    opt = optimizer(model.parameters())
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for b in torch.randperm(len(x), generator=g).split(16):
            loss = loss_fn(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    params = TrainParams.model_validate({"model": {"arch": "resnet18"}, "image_size": SIZE})
    images, ys, _ = squares(60, seed=0)
    model = train("classify", params, 3, images, ys, 6,
                  lambda p: torch.optim.SGD(p, 0.01, momentum=0.9), torch.nn.functional.cross_entropy)
    return write_model(tmp_path_factory.mktemp("classify"), "classify", params, model, ["left", "right", "none"])


def right_share(cam: np.ndarray) -> float:
    return float(cam[:, cam.shape[1] // 2:].sum() / max(cam.sum(), 1e-9))


def test_classify_cam_lights_the_side_of_the_square(classifier):
    predictor = ModelPredictor(classifier)
    images, ys, _ = squares(12, seed=1)
    preds = predictor.predict(images)
    assert [p["label"] for p in preds] == ys  # trivially separable: the model got it
    for name, k in (("right", 1), ("left", 0)):
        chosen = [im for im, y in zip(images, ys) if y == k]
        shares = [right_share(e.cam) for e in explain(predictor, chosen, class_name=name)]
        right = shares if name == "right" else [1 - s for s in shares]  # the share on the class's side
        assert np.mean(right) > 0.65 and min(right) > 0.55, (name, np.round(shares, 2))
    # the CAM comes back in each image's own pixels, whatever the model's input size
    wide = np.concatenate([images[1], images[1][:, :40]], axis=1)
    e, right = explain(predictor, [wide, images[1]])
    assert e.cam.shape == wide.shape[:2] and e.cam.dtype == np.float32 and 0 <= e.cam.min() and e.cam.max() <= 1
    assert right.target == "right" and right.predicted.startswith("right") and right.method == "Grad-CAM"


def test_segment_cam_lies_in_the_class_region(tmp_path):
    params = TrainParams.model_validate({"model": {"arch": "unet", "width": 0.25}, "image_size": SIZE})
    images, _, masks = squares(48, seed=0, classes=1)
    model = train("segment", params, 1, images, [m.astype(np.int64) for m in masks], 8,
                  lambda p: torch.optim.AdamW(p, 3e-3),
                  lambda out, y: torch.nn.functional.cross_entropy(out, y, weight=torch.tensor([1.0, 4.0])))
    predictor = ModelPredictor(write_model(tmp_path / "segment", "segment", params, model, ["square"]))
    test, _, truth = squares(6, seed=1, classes=1)
    test[0], truth[0] = np.concatenate([test[0], test[0][:, :20]], 1), np.concatenate([truth[0], truth[0][:, :20]], 1)
    explained = explain(predictor, test)
    inside = [float((e.cam * m).sum() / e.cam.sum()) for e, m in zip(explained, truth)]
    assert all(e.cam.shape == m.shape for e, m in zip(explained, truth))
    assert all(e.region and e.target == "square" for e in explained)
    assert np.mean(inside) > 0.7, np.round(inside, 2)  # the square covers 1/16 of the image


class FixedDetections(torch.nn.Module):
    """A real detector's backbone (what EigenCAM reads) with fixed detections in input pixels."""

    def __init__(self, detector: torch.nn.Module, outputs: dict[str, torch.Tensor]):
        super().__init__()
        self.backbone, self.outputs = detector.backbone, outputs

    def forward(self, images):
        self.backbone(torch.stack(list(images)))
        return [dict(self.outputs) for _ in images]


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    params = TrainParams.model_validate({"model": {"arch": "fasterrcnn", "backbone": "mobilenet_v3_large",
                                                   "width": 0.5, "score_threshold": 0.0}, "image_size": SIZE})
    model = get_task("detect").build_model(params, 2, pretrained=False)
    return write_model(tmp_path_factory.mktemp("detect"), "detect", params, model, ["a", "b"])


def test_detect_cam_is_kept_in_the_predicted_boxes_of_the_class(detector):
    predictor = ModelPredictor(detector)
    # input pixels (64 x 64): class "a" at [8, 8, 24, 24] (0.9) and [40, 40, 56, 56] (0.3); "b" at [32, 0, 64, 16]
    predictor.model = FixedDetections(predictor.model, {
        "boxes": torch.tensor([[8.0, 8, 24, 24], [40, 40, 56, 56], [32, 0, 64, 16]]),
        "labels": torch.tensor([1, 1, 2]), "scores": torch.tensor([0.9, 0.3, 0.6])})
    image = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)  # twice the input size
    e = explain(predictor, [image])[0]  # default: the class of the best box, boxes >= 0.5 only
    assert e.target == "a" and e.boxes == [[16.0, 16.0, 48.0, 48.0]] and e.method == "EigenCAM (in boxes)"
    assert e.cam.shape == (128, 128) and e.cam[16:48, 16:48].max() > 0.9
    outside = np.ones_like(e.cam, bool)
    outside[14:50, 14:50] = False  # a pixel's margin for the bilinear resize at the box border
    assert e.cam[outside].max() == 0.0
    b = explain(predictor, [image], class_name="b")[0]
    assert b.target == "b" and b.boxes == [[64.0, 0.0, 128.0, 32.0]] and b.cam[40:, :56].max() == 0.0
    low = explain(predictor, [image], class_name="a", min_score=0.2)[0]
    assert len(low.boxes) == 2 and low.cam[80:112, 80:112].max() > 0.9
    none = explain(predictor, [image], min_score=0.95)[0]  # no box: the whole image's EigenCAM
    assert none.boxes == [] and "no box" in none.target and (none.cam > 0).mean() > 0.2


def test_in_boxes_rescales_inside_each_box_and_zeroes_the_rest():
    cam = np.array([[0.0, 0.1, 0.2, 0.3],
                    [0.4, 0.5, 0.6, 0.7],
                    [0.8, 0.9, 1.0, 0.0],
                    [0.2, 0.2, 0.2, 0.2]], np.float32)
    out = in_boxes(cam, np.array([[1, 0, 3, 2], [0, 3, 4, 4]]))  # xyxy: columns 1-2 of rows 0-1; row 3
    expected = np.zeros((4, 4), np.float32)
    expected[0:2, 1:3] = [[0.0, 0.2], [0.8, 1.0]]  # (v - 0.1) / (0.6 - 0.1)
    expected[3, :] = 1.0  # a flat box is all 1
    np.testing.assert_allclose(out, expected, atol=1e-6)


def _save(folder: Path, images, names) -> None:
    for im, name in zip(images, names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / name)


def test_cli_explain_writes_overlays_grid_and_filters(classifier, tmp_path, capsys):
    images, ys, _ = squares(6, seed=2)
    names = [f"{['left', 'right', 'none'][y]}/{i}.png" for i, y in enumerate(ys)]
    _save(tmp_path / "images", images, names)
    out = tmp_path / "out"
    assert main(["explain", "--model", str(classifier), "--images", str(tmp_path / "images"), "--out", str(out),
                 "--filters"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([f"{i}.png" for i in range(6)] + ["grid.png", "filters.png"])
    assert all(Image.open(out / n).size[0] > 100 for n in written)
    assert "Grad-CAM of 6 images" in capsys.readouterr().out
    assert main(["explain", "--model", str(classifier), "--images", str(tmp_path / "images" / "right"),
                 "--out", str(tmp_path / "out2"), "--class", "left"]) == 0


def test_cli_explain_bad_inputs_exit_2_naming_them(classifier, tmp_path, capsys):
    images, ys, _ = squares(2, seed=3)
    _save(tmp_path / "images", images, ["a.png", "b.png"])
    assert main(["explain", "--model", str(classifier), "--images", str(tmp_path / "images"), "--class",
                 "middle", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'middle'" in err and "left, right, none" in err and "Traceback" not in err
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    assert main(["explain", "--model", str(classifier), "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "broken.png: not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "o" / "grid.png").exists()
    assert main(["explain", "--model", str(tmp_path / "nowhere"), "--images", str(tmp_path / "images" / "a.png"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_cli_explain_detector_and_multilabel_folders(detector, tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    _save(tmp_path / "images", [image], ["x.jpg"])
    assert main(["explain", "--model", str(detector), "--images", str(tmp_path / "images"), "--out",
                 str(tmp_path / "det"), "--min-score", "0", "--filters"]) == 0
    assert {p.name for p in (tmp_path / "det").iterdir()} == {"x.png", "grid.png", "filters.png"}
    params = TrainParams.model_validate({"model": {"arch": "mobilenet_v3_small"}, "image_size": SIZE})
    torch.manual_seed(0)
    model = get_task("multilabel").build_model(params, 3, pretrained=False)
    folder = write_model(tmp_path / "multilabel", "multilabel", params, model, ["p", "q", "r"])
    e = explain(ModelPredictor(folder), [image], class_name="q")[0]
    assert e.cam.shape == (48, 80) and e.target == "q" and e.method == "Grad-CAM"


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_evaluate_stage_draws_cams_for_mlflow_and_inspect_stores_them_in_fiftyone(tmp_path, task):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from project import make_project

    from visionflow.core.config import load_params
    from visionflow.core.paths import Paths
    from visionflow.stages import get_stage

    over = {"synth": {"n": 24}, task: {"train": {"epochs": 1}, "evaluate": {"grid_images": 4}}}
    params_file = make_project(tmp_path, over, name=f"explain-{task}", tasks=(task,))
    params, paths = load_params(params_file), Paths(tmp_path)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)
    branch = paths.for_task(task)
    for name in (f"train-{task}", f"evaluate-{task}", f"inspect-{task}"):
        get_stage(name, params).run(params, branch)
    grid = branch.figures_dir / "explain_grid.png"
    assert grid.is_file() and Image.open(grid).size[0] > 300
    assert Image.open(branch.figures_dir / "filters.png").size[0] > 300
    cams = json.loads((branch.figures_dir / "cams.json").read_text())
    assert len(cams) == 4
    # the inspect stage stores them as FiftyOne Heatmap fields of those test samples
    from visionflow.integrations.fiftyone import load_dataset

    summary = json.loads(branch.inspection.read_text())
    dataset = load_dataset(summary["dataset"])
    with_cam = dataset.exists("cam")
    assert sorted(with_cam.values("sample_id")) == sorted(cams)
    heatmap = with_cam.first()["cam"]
    assert heatmap.range == [0, 255] and Path(heatmap.map_path).is_file()
    # and the saved view `explained` opens the App on them
    assert sorted(dataset.load_saved_view("explained").values("sample_id")) == sorted(cams)
    assert "cam" in dataset.app_config.active_fields.paths  # drawn when the App opens, with the labels
    assert "ground_truth" in dataset.app_config.active_fields.paths


def test_cli_explain_takes_a_registered_model(tmp_path, capsys):
    """models:/NAME@ALIAS resolves as `visionflow predict` does (the store from --params)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_register import registered_params_file

    params_file, _, _ = registered_params_file(tmp_path, "explain-test")
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    _save(tmp_path / "images", [image], ["a.png"])
    assert main(["explain", "--model", "models:/explain-test@candidate", "--params", str(params_file),
                 "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"a.png", "grid.png"}
    assert "Grad-CAM of 1 image ->" in capsys.readouterr().out
    assert main(["explain", "--model", "models:/no-such-model@candidate", "--params", str(params_file),
                 "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")]) == 2
    assert "no-such-model" in capsys.readouterr().err
