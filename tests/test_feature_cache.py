"""Cached features for `mode: feature_extract` (train.feature_cache, visionflow.training.feature_cache,
docs/training-loader.md): the head trained on cached features equals the head trained through the
frozen backbone every epoch; the saved model is the whole network and predicts the same; the
cache refuses augmentation; a frozen backbone stays in inference mode while the head trains; a
stopped run resumes exactly."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

from visionflow.core.config import ConfigError, load_params  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.deploy.predictor import load_predictor  # noqa: E402
from visionflow.manifest import read_manifest  # noqa: E402
from visionflow.manifest.images import load_rgb  # noqa: E402
from visionflow.models.classifiers import build_classifier, feature_head  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402
from visionflow.training.engine import build_optimizer, build_scheduler, FitConfig, train_one_epoch  # noqa: E402


def _project(root: Path, arch: str, feature_cache: bool, task: str = "classify", **train) -> tuple:
    over = {"synth": {"n": 40}, task: {"train": {
        "model": {"arch": arch, "weights": None, "mode": "feature_extract"}, "epochs": 2, "batch_size": 8,
        "image_size": 48, "num_workers": 0, "augment": {"preset": "none"}, "feature_cache": feature_cache, **train}}}
    params_file = make_project(root, over, tasks=(task,))
    params, paths = load_params(params_file), Paths(root, task=task)
    for name in ("synth", "ingest", "split", f"train-{task}"):
        get_stage(name, params).run(params, paths)
    return params, paths


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])  # mobilenet_v2: a Dropout before the head
def test_cached_features_train_the_same_head_and_save_the_whole_model(tmp_path, arch):
    _, a = _project(tmp_path / "a", arch, feature_cache=False)
    _, b = _project(tmp_path / "b", arch, feature_cache=True)
    wa = torch.load(a.model_dir / "model.pt", weights_only=True)
    wb = torch.load(b.model_dir / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()  # the whole network, not just the head
    head = {f"{p}.{n}" for p in (("fc",) if arch == "resnet18" else ("classifier.1",)) for n in ("weight", "bias")}
    for k in wa:
        if k in head:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
        else:  # the frozen backbone, BatchNorm statistics included, is untouched by training
            assert torch.equal(wa[k], wb[k]), k
    # the saved models predict the same (evaluate, predict and export load this folder)
    images = [load_rgb(s.image_path(b.root)) for s in read_manifest(b.manifest)[:6]]
    pa = load_predictor(a.model_dir).predict(images)
    pb = load_predictor(b.model_dir).predict(images)
    np.testing.assert_allclose([p["probs"] for p in pa], [p["probs"] for p in pb], rtol=1e-4, atol=1e-5)
    assert [p["label"] for p in pa] == [p["label"] for p in pb]


def test_feature_cache_on_a_multilabel_branch(tmp_path):
    _, paths = _project(tmp_path, "resnet18", feature_cache=True, task="multilabel", epochs=1)
    assert (paths.model_dir / "model.pt").exists()
    predictor = load_predictor(paths.model_dir)
    assert len(predictor.meta["thresholds"]) == predictor.meta["num_classes"]  # calibrated on cached val features


def _params(tmp_path: Path, train: dict, task: str = "classify"):
    return load_params(make_project(tmp_path, {task: {"train": train}}, tasks=(task,)))


def test_the_cache_refuses_augmentation_and_other_modes(tmp_path):
    fe = {"model": {"mode": "feature_extract"}, "feature_cache": True}
    with pytest.raises(ConfigError) as exc:
        _params(tmp_path, {**fe, "augment": {"preset": "light"}})
    assert "train.feature_cache" in str(exc.value) and "train.augment.preset: light" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        _params(tmp_path, {**fe, "augment": {"preset": "none", "transforms": [{"name": "HorizontalFlip"}]}})
    assert "train.feature_cache" in str(exc.value) and "train.augment.transforms" in str(exc.value)
    with pytest.raises(ConfigError, match="feature_extract"):
        _params(tmp_path, {"feature_cache": True, "augment": {"preset": "none"}})
    with pytest.raises(ConfigError, match="detect.train.feature_cache"):
        _params(tmp_path, {**fe, "augment": {"preset": "none"}}, task="detect")
    ok = _params(tmp_path, {**fe, "augment": {"preset": "none", "transforms": []}})
    assert ok.classify.train.feature_cache


@pytest.mark.parametrize("arch,head", [("resnet18", ["fc"]), ("mobilenet_v2", ["classifier.0", "classifier.1"]),
                                       ("mobilenet_v3_small", ["classifier.2", "classifier.3"])])
def test_feature_head_is_the_linear_and_the_dropout_before_it(arch, head):
    model = build_classifier(arch, 3, mode="feature_extract")
    tail = feature_head(model, arch)
    assert [id(m) for m in tail] == [id(model.get_submodule(p)) for p in head]


def test_a_frozen_backbone_stays_in_inference_mode_while_the_head_trains():
    torch.manual_seed(0)
    model = build_classifier("resnet18", 3, mode="feature_extract")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    from visionflow.tasks import get_task

    cfg = FitConfig(epochs=1, lr=1e-2)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    train_one_epoch(get_task("classify"), model, batches, opt, build_scheduler(opt, 1, 2, 0),
                    torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), None, 5.0, 1)
    after = model.state_dict()
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    for k in before:
        if not k.startswith("fc."):
            assert torch.equal(before[k], after[k]), k  # BatchNorm running statistics included


def test_a_crashed_feature_cache_run_resumes_to_the_weights_of_a_straight_run(tmp_path, monkeypatch):
    """The checkpoint holds the head; the resumed process recomputes the features and ends
    where a run that never stopped ends, bit for bit."""
    import json

    import visionflow.training.engine as engine

    _, straight = _project(tmp_path / "a", "mobilenet_v2", feature_cache=True, epochs=3)
    save = engine._save_checkpoint

    def save_then_crash(ckpt_dir, cfg, model, optimizer, scheduler, scaler, state, ema=None):
        save(ckpt_dir, cfg, model, optimizer, scheduler, scaler, state, ema)
        if state["epoch"] == 1:
            raise KeyboardInterrupt("killed after epoch 1")

    monkeypatch.setattr(engine, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _project(tmp_path / "b", "mobilenet_v2", feature_cache=True, epochs=3)
    monkeypatch.setattr(engine, "_save_checkpoint", save)
    params, resumed = load_params(tmp_path / "b" / "params.yaml"), Paths(tmp_path / "b")
    get_stage("train-classify", params).run(params, resumed)
    assert json.loads(resumed.train_run.read_text())["resumed_from_epoch"] == 1
    a = torch.load(straight.model_dir / "model.pt", weights_only=True)
    b = torch.load(resumed.model_dir / "model.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cached_features_train_where_the_backbone_runs_channels_last(tmp_path):
    """channels_last applies to the image batches only: the head's (B, D) feature batches have no
    channel axis (NHWC on a 2-D tensor is an error). `always` takes the CPU down CUDA's path."""
    _, paths = _project(tmp_path, "resnet18", feature_cache=True, epochs=1, channels_last="always")
    assert (paths.model_dir / "model.pt").exists()
