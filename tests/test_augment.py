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
