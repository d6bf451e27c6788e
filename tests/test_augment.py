import albumentations as A
import numpy as np
import pytest

from visionflow.training.augment import PRESETS, build_eval_transform, build_train_transform
from visionflow.core.errors import UserError


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_serialization_round_trip_gives_identical_outputs(preset):
    image = np.random.default_rng(0).integers(0, 255, (80, 70, 3), dtype=np.uint8)
    tf = build_train_transform(preset, None, 64)
    restored = A.from_dict(A.to_dict(tf))
    tf.set_random_seed(7)
    restored.set_random_seed(7)
    for _ in range(3):
        a, b = tf(image=image)["image"], restored(image=image)["image"]
        assert a.shape == (64, 64, 3) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_explicit_list_wins_over_preset():
    tf = build_train_transform("medium", [{"name": "VerticalFlip", "p": 1.0}], 32)
    names = [t.__class__.__name__ for t in tf.transforms]
    assert names == ["Resize", "VerticalFlip", "Normalize"]


def test_unknown_transform_and_bad_kwargs():
    with pytest.raises(UserError, match="unknown Albumentations transform 'Wobble'"):
        build_train_transform("none", [{"name": "Wobble"}], 32)
    with pytest.raises(UserError, match="VerticalFlip"):
        build_train_transform("none", [{"name": "VerticalFlip", "nonsense": 1}], 32)


def test_eval_transform_is_deterministic():
    image = np.full((50, 50, 3), 128, dtype=np.uint8)
    tf = build_eval_transform(32)
    np.testing.assert_array_equal(tf(image=image)["image"], tf(image=image)["image"])


def test_importing_the_augmentations_makes_no_network_call():
    """Albumentations checks PyPI for updates on import unless NO_ALBUMENTATIONS_UPDATE is set;
    visionflow sets it. A fresh interpreter whose sockets refuse to connect imports the train
    stage's augmentation module and builds a pipeline without any connection attempt."""
    import subprocess
    import sys

    code = (
        "import os, socket\n"
        "os.environ.pop('NO_ALBUMENTATIONS_UPDATE', None)\n"
        "calls = []\n"
        "def refuse(self, *a, **k):\n"
        "    calls.append(a)\n"
        "    raise OSError('network disabled in this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.socket.connect_ex = refuse\n"
        "from visionflow.training.augment import PRESETS\n"
        "import albumentations\n"
        "print('connections', len(calls))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("connections 0"), out.stdout + out.stderr
