"""The training data loader (visionflow.training.loader, docs/training-loader.md): per-sample
augmentation seeds (different across samples and workers, the same with 0 or 2 workers), exact
resume of a SIGKILLed train stage with 2 workers and a disk cache, the decoded-image cache
(none / ram / disk give the same batches; ram refused when it would not fit), and
`num_workers: auto`."""
from __future__ import annotations

import dataclasses
import hashlib
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from project import kill_training_after_epoch, make_project  # noqa: E402

import visionflow.training.loader as loader  # noqa: E402
from visionflow.core.config import AugmentParams, ModelParams, TrainParams, load_params  # noqa: E402
from visionflow.core.errors import UserError  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.manifest import Instance, Sample  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402
from visionflow.stages.train import build_loaders  # noqa: E402
from visionflow.tasks import get_task  # noqa: E402
from visionflow.training.distributed import SINGLE  # noqa: E402
from visionflow.training.engine import LAST  # noqa: E402

# Random draws with continuous parameters, each applied every time: two samples with the same
# input and the same draws give the same pixels, different draws different pixels.
RANDOM = [{"name": "Affine", "rotate": (-30, 30), "scale": (0.8, 1.2), "p": 1.0},
          {"name": "RandomBrightnessContrast", "brightness_limit": 0.3, "contrast_limit": 0.3, "p": 1.0}]


def _write(path: Path, image: np.ndarray) -> str:
    Image.fromarray(image).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_image_samples(root: Path, n: int) -> list[Sample]:
    """n samples of one and the same image (labelled with their index, so a batch names them)."""
    image = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    sha = _write(root / "same.png", image)
    return [Sample(id=f"s{i}", root=str(root), path="same.png", width=100, height=80, sha256=sha, labels=[i])
            for i in range(n)]


def _shapes_samples(root: Path, n: int) -> list[Sample]:
    """n 120x90 images, each with a rectangle (polygon) and a triangle of two classes."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        image = rng.integers(0, 60, (90, 120, 3), dtype=np.uint8)
        image[10 + i:50, 8:60] = (220, 40, 40)
        name = f"img{i}.png"
        sha = _write(root / name, image)
        rect = Instance(bbox=[8, 10 + i, 60, 50], category_id=0, polygons=[[8, 10 + i, 60, 10 + i, 60, 50, 8, 50]])
        tri = Instance(bbox=[62, 20, 110, 80], category_id=1, polygons=[[62, 80, 86, 20, 110, 80]])
        out.append(Sample(id=f"img{i}", root=str(root), path=name, width=120, height=90, sha256=sha,
                          instances=[rect, tri]))
    return out


def _params(**kw) -> TrainParams:
    base = dict(model=ModelParams(arch="resnet18"), image_size=64, batch_size=4,
                augment=AugmentParams(transforms=RANDOM), device="cpu")
    return TrainParams(**{**base, **kw})


def _epoch(params: TrainParams, samples: list[Sample], root: Path, epoch_seed: int) -> dict[int, torch.Tensor]:
    """One epoch of the real train loader: {sample index: augmented image}."""
    task = get_task("classify", params)
    train_tf, eval_tf = task.build_transforms(params)
    train_ds, val_ds = task.build_dataset(samples, train_tf, root), task.build_dataset(samples[:2], eval_tf, root)
    train_loader, _, sampler = build_loaders(task, params, Paths(root), train_ds, val_ds, torch.device("cpu"), SINGLE)
    assert train_loader.num_workers == (params.num_workers if params.num_workers != "auto" else 0)
    sampler.set_epoch(epoch_seed)
    out = {}
    for images, labels in train_loader:
        out.update({int(y): x for x, y in zip(images, labels)})
    return out


def test_augmentations_differ_across_samples_and_workers_and_not_with_worker_count(tmp_path):
    samples = _same_image_samples(tmp_path, 16)
    two = _epoch(_params(num_workers=2), samples, tmp_path, epoch_seed=7)
    assert sorted(two) == list(range(16))
    flat = {i: x.numpy().tobytes() for i, x in two.items()}
    assert len(set(flat.values())) == 16, "two samples of one epoch got the same augmentation"
    zero = _epoch(_params(num_workers=0), samples, tmp_path, epoch_seed=7)
    assert sorted(zero) == sorted(two)
    for i in two:  # same (seed, epoch, index): same pixels, whichever worker (or none) made them
        assert torch.equal(zero[i], two[i]), i
    other_epoch = _epoch(_params(num_workers=2), samples, tmp_path, epoch_seed=8)
    assert all(not torch.equal(other_epoch[i], two[i]) for i in two)


def test_sample_seed_is_a_function_of_epoch_rank_and_index():
    assert loader.sample_seed(1, 0, 5) == loader.sample_seed(1, 0, 5)
    seeds = {loader.sample_seed(e, r, i) for e in range(3) for r in range(2) for i in range(50)}
    assert len(seeds) == 300
    assert loader.sample_seed(-3, 0, 1) >= 0  # negative train.seed works


def test_dataset_access_leaves_the_main_process_generators_alone(tmp_path):
    params = _params()
    task = get_task("classify", params)
    ds = task.build_dataset(_same_image_samples(tmp_path, 2), task.build_transforms(params)[0], tmp_path)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ds[(0, 123)]
    assert torch.equal(torch.rand(3), expected)


def test_seeded_augmentations_draw_each_step_independently(tmp_path):
    """The `light` preset's flip (p=0.5) and brightness/contrast (p=0.5), seeded per sample as
    training seeds them: all four combinations come up, each about a quarter of the time.
    Albumentations' own Compose.set_random_seed seeded every step with the same seed, so both
    steps drew the same number: flipped samples were always recoloured and the others never."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = np.linspace(20, 90, 32, dtype=np.uint8)[None, :, None]  # dark ramp left,
    image[:, 32:] = 200  # bright right: a flip and a colour change are told apart
    sha = _write(tmp_path / "a.png", image)
    samples = [Sample(id="a", root=str(tmp_path), path="a.png", width=64, height=64, sha256=sha, labels=[0])]
    params = _params(image_size=64, augment=AugmentParams(preset="light"))
    task = get_task("classify", params)
    ds = task.build_dataset(samples, task.build_transforms(params)[0], tmp_path)
    assert ds.defer_normalization() is not None  # uint8 out: the pixels as augmented
    record = ds.record(0)["image"]
    combos = Counter()
    for seed in range(200):
        x = ds[(0, seed)][0].permute(1, 2, 0).numpy()
        flipped = x[:, :32].mean() > x[:, 32:].mean()
        recoloured = not np.array_equal(x, record[:, ::-1] if flipped else record)
        combos[flipped, recoloured] += 1
    assert set(combos) == {(False, False), (False, True), (True, False), (True, True)}, combos
    assert min(combos.values()) >= 30, combos  # 50 each expected
    assert ds[(0, 5)][0].equal(ds[(0, 5)][0])  # and still a function of the seed


def test_a_step_drawing_from_python_s_global_generator_is_not_tied_to_the_pipeline(tmp_path):
    """A custom step that draws from python's global `random` (an A.Lambda here) draws
    independently of the built-in steps: seed_globals once seeded the global generator with the
    sample's seed, the same stream as the pipeline's random.Random(seed), so the Lambda's draw
    < 0.5 came up exactly when the flip (p=0.5) applied."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 200  # bright right: a flip is told apart
    sha = _write(tmp_path / "a.png", image)
    samples = [Sample(id="a", root=str(tmp_path), path="a.png", width=32, height=32, sha256=sha, labels=[0])]
    params = _params(image_size=32, augment=AugmentParams(preset="none"))
    task = get_task("classify", params)
    ds = task.build_dataset(samples, task.build_transforms(params)[0], tmp_path)
    draws = []

    def custom(img, **kwargs):
        draws.append(random.random())
        return img

    ds.transform = A.Compose([A.HorizontalFlip(p=0.5), A.Lambda(image=custom)])
    state = random.getstate()
    combos = Counter()
    for seed in range(200):
        x = ds[(0, seed)][0]
        combos[bool(x[0, :, :16].float().mean() > x[0, :, 16:].float().mean()), draws[-1] < 0.5] += 1
    assert set(combos) == {(False, False), (False, True), (True, False), (True, True)}, combos
    assert min(combos.values()) >= 30, combos  # 50 each expected
    assert random.getstate() == state  # the main process's own generator is restored after each item
    ds[(0, 7)]
    first = draws[-1]
    ds[(0, 7)]
    assert draws[-1] == first  # still a function of the seed


def test_a_one_step_pipeline_draws_what_it_drew_before(tmp_path):
    """Seeding with one stream for all steps leaves a lone step's draws as Albumentations' own
    seeding gave them, so one-step recipes (examples/fashion-mnist) train on the same pixels."""
    samples = _shapes_samples(tmp_path, 1)
    params = _params(image_size=48, augment=AugmentParams(transforms=[
        {"name": "Affine", "rotate": (-30, 30), "scale": (0.8, 1.2), "p": 0.7}]))
    task = get_task("classify", params)
    tf = task.build_transforms(params)[0]
    ds = task.build_dataset(samples, tf, tmp_path)
    raw = ds.raw(0)["image"]
    for seed in range(12):
        tf.set_random_seed(seed)  # Albumentations' seeding, as the loader did it
        assert np.array_equal(ds[(0, seed)][0].numpy(), tf(image=raw)["image"].transpose(2, 0, 1)), seed


@pytest.mark.parametrize("task_name", ["detect", "segment"])
def test_cache_ram_and_disk_give_the_batches_of_none(tmp_path, task_name):
    samples = _shapes_samples(tmp_path, 3)
    # detect: Mask R-CNN's params, so the records carry instance masks through the caches too
    model = ModelParams(arch="maskrcnn") if task_name == "detect" else ModelParams()
    params = TrainParams(image_size=64, model=model, augment=AugmentParams(preset="medium"), device="cpu")
    task = get_task(task_name, params)
    train_tf, _ = task.build_transforms(params)

    def items(mode: str) -> list:
        ds = task.build_dataset(samples, train_tf, tmp_path)
        ds.use_cache(mode, tmp_path / "cache")
        return [ds[(i, 1000 * epoch + i)] for epoch in range(2) for i in range(len(samples))]

    reference = items("none")
    for mode in ("ram", "disk", "disk"):  # the second disk pass reads what the first wrote
        for (x, y), (x_ref, y_ref) in zip(items(mode), reference):
            assert torch.equal(x, x_ref), mode
            if isinstance(y, dict):
                assert y.keys() == y_ref.keys() and all(torch.equal(y[k], y_ref[k]) for k in y), mode
                assert len(y["boxes"]) and y["masks"].shape[-2:] == (64, 64)
            else:
                assert torch.equal(y, y_ref) and set(np.unique(y.numpy())) >= {0, 1, 2}, mode
    written = list((tmp_path / "cache").rglob("*.npy"))
    assert len(written) == len(samples) and not list((tmp_path / "cache").rglob("*.tmp"))
    assert {p.stem for p in written} == {s.sha256 for s in samples}
    assert np.load(written[0]).shape[:2] == (64, 64)  # decoded and resized, before augmentation


def test_masks_are_rasterised_once_per_sample(tmp_path, monkeypatch):
    import visionflow.tasks.segment as segment

    samples = _shapes_samples(tmp_path, 2)
    params = TrainParams(image_size=64, device="cpu")
    task = get_task("segment", params)
    calls = []
    real = segment.semantic_mask
    monkeypatch.setattr(segment, "semantic_mask", lambda s: calls.append(s.id) or real(s))
    ds = task.build_dataset(samples, task.build_transforms(params)[0], tmp_path)
    for epoch in range(3):
        for i in range(len(ds)):
            ds[(i, epoch * 10 + i)]
    assert sorted(calls) == ["img0", "img1"]


def test_cache_ram_refused_when_it_would_not_fit(tmp_path, monkeypatch):
    params_file = make_project(tmp_path, {"synth": {"n": 24}, "classify": {"train": {"cache": "ram"}}})
    params, paths = load_params(params_file), Paths(tmp_path)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)
    monkeypatch.setattr(loader, "available_memory", lambda: 10_000)
    with pytest.raises(UserError, match=r"classify\.train\.cache.*ram needs about 168 KiB for 14 decoded images, "
                                        r"but 10 KiB of memory is available"):
        get_stage("train-classify", params).run(params, paths)
    monkeypatch.setattr(loader, "available_memory", lambda: 2**40)
    assert get_stage("train-classify", params).run(params, paths)["epochs_run"] == 1


def test_auto_num_workers(monkeypatch):
    big, batch = 10_000, 32
    assert loader.auto_num_workers(big, batch, cores=2, local_world=1) == 1
    assert loader.auto_num_workers(big, batch, cores=1, local_world=1) == 0
    assert loader.auto_num_workers(big, batch, cores=16, local_world=1) == 8  # capped
    assert loader.auto_num_workers(big, batch, cores=16, local_world=4) == 3  # torchrun: a share each
    assert loader.auto_num_workers(big, batch, cores=16, local_world=16) == 0
    assert loader.auto_num_workers(7 * batch, batch, cores=16, local_world=1) == 0  # a few batches: no workers
    assert loader.auto_num_workers(8 * batch, batch, cores=16, local_world=1) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(loader, "available_cores", lambda: 8)
    assert loader.resolve_num_workers("auto", big, batch) == 3
    assert loader.resolve_num_workers(5, 10, batch) == 5  # a number is taken as given
    assert TrainParams().num_workers == "auto"
    with pytest.raises(ValueError):
        TrainParams(num_workers=-1)


def _train_project(root: Path, **train) -> tuple:
    over = {"synth": {"n": 40}, "classify": {"train": {"epochs": 3, "batch_size": 8, "image_size": 48,
                                                       "augment": {"preset": "medium"}, **train}}}
    params_file = make_project(root, over)
    params, paths = load_params(params_file), Paths(root)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)
    return params_file, params, paths


def test_killed_training_with_two_workers_resumes_to_the_weights_of_a_straight_run(tmp_path):
    """Straight: 0 workers, no cache. Killed (SIGKILL after epoch 1) and resumed: 2 persistent
    workers and the disk cache. Same weights, bit for bit. Both through the CLI, so both train
    on the same number of threads: the test process's count is whatever earlier tests left
    (test_promote sets one thread when it is collected), and a straight run on one thread
    against a resumed run on two differed in conv1.weight (CI, 2026-12-07)."""
    params_a_file, _, paths_a = _train_project(tmp_path / "a", num_workers=0)
    straight = subprocess.run([sys.executable, "-m", "visionflow.cli", "stage", "train-classify", "--params",
                               str(params_a_file)], cwd=paths_a.root, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    params_file, _, paths_b = _train_project(tmp_path / "b", num_workers=2, cache="disk")
    cmd = [sys.executable, "-m", "visionflow.cli", "stage", "train-classify", "--params", str(params_file)]
    killed_at = kill_training_after_epoch(cmd, paths_b.root, paths_b.checkpoint_dir / LAST)
    assert 1 <= killed_at < 3, f"kill landed at epoch {killed_at}"

    out = subprocess.run(cmd, cwd=paths_b.root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stderr
    assert list((paths_b.checkpoint_dir.parent / "decoded").rglob("*.npy"))
    a = torch.load(paths_a.model_dir / "model.pt", weights_only=True)
    b = torch.load(paths_b.model_dir / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("preset,normalize,resize", [("medium", True, "stretch"), ("light", False, "stretch"),
                                                     ("none", True, "stretch"), ("medium", True, "letterbox"),
                                                     ("medium", False, "letterbox")])
def test_record_then_rest_is_the_full_pipeline_bit_for_bit(preset, normalize, resize):
    """The cache's split (resize once, the rest per epoch, normalisation as LUTs) changes no
    pixel: what prediction's eval transform and the serialised pipeline do is what trains.
    Masks move the same; boxes within float rounding."""
    from visionflow.training.augment import build_eval_transform, build_train_transform

    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (300, 410, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (300, 410), dtype=np.uint8)
    boxes = dict(bboxes=np.array([[10, 20, 200, 250], [300, 10, 400, 100]], np.float32), labels=[1, 2],
                 instance_ids=[0, 1])
    for tf in (build_train_transform(preset, None, 96, normalize=normalize, boxes=True, resize=resize),
               build_eval_transform(96, normalize=normalize, boxes=True, resize=resize)):
        prefix, rest = loader.split_transform(tf)
        assert prefix is not None
        for seed in range(4):
            loader.seed_pipeline(tf, seed)
            loader.seed_pipeline(rest, seed)
            full = tf(image=image, mask=mask, **boxes)
            record = prefix(image=image, mask=mask, **boxes)
            split = rest(**{k: record[k] for k in ("image", "mask", "bboxes", "labels", "instance_ids")})
            assert full["image"].dtype == split["image"].dtype and np.array_equal(full["image"], split["image"]), seed
            assert np.array_equal(full["mask"], split["mask"]), seed
            assert np.allclose(np.asarray(full["bboxes"]), np.asarray(split["bboxes"]), atol=1e-4), seed
            assert list(full["labels"]) == list(split["labels"]), seed


def test_workers_start_after_the_main_process_used_opencv_threads(tmp_path):
    """Filling the ram cache resizes images with OpenCV's thread pool in the main process before
    the workers fork; a worker must not touch that pool's (absent) threads. It once hung here
    (cv2.setNumThreads in worker_init_fn), so the check runs in a subprocess with a timeout."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
import cv2, numpy as np
import test_loader as T
cv2.resize(np.zeros((3000, 3000, 3), np.uint8), (1500, 1500))  # starts OpenCV's pool
root = Path({str(tmp_path)!r})
out = T._epoch(T._params(num_workers=2, cache="ram"), T._same_image_samples(root, 8), root, epoch_seed=1)
print(len(out))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.split()[-1] == "8", out.stderr[-2000:]


def _train_loader(task, params: TrainParams, samples: list[Sample], root: Path, on_device: bool):
    """(train dataset, train loader, sampler) of the train stage's build_loaders."""
    train_tf, eval_tf = task.build_transforms(params)
    train_ds = task.build_dataset(samples, train_tf, root)
    val_ds = task.build_dataset(samples[:2], eval_tf, root)
    train_loader, _, sampler = build_loaders(task, params, Paths(root), train_ds, val_ds, torch.device("cpu"),
                                             SINGLE, normalize_on_device=on_device)
    return train_ds, train_loader, sampler


@pytest.mark.parametrize("task_name,workers", [("classify", 0), ("detect", 0), ("segment", 2)])
def test_uint8_batches_normalised_on_the_device_are_the_loaders_batches_bit_for_bit(tmp_path, task_name, workers):
    """On CUDA the train loader hands over uint8 batches (a quarter of the bytes to pass between
    processes, pin and copy) and DeviceNormalize does the final A.Normalize on the device: the
    batches the model sees are those of a loader that normalises, bit for bit."""
    samples = _shapes_samples(tmp_path, 8) if task_name != "classify" else _same_image_samples(tmp_path, 8)
    params = TrainParams(image_size=64, batch_size=4, num_workers=workers, augment=AugmentParams(preset="medium"),
                         device="cpu")
    task = get_task(task_name, params)

    def batches(on_device: bool):
        train_ds, train_loader, sampler = _train_loader(task, params, samples, tmp_path, on_device)
        sampler.set_epoch(5)
        return train_ds.device_normalize, list(train_loader)

    none, reference = batches(False)
    normalize, deferred = batches(True)
    assert none is None and normalize is not None
    assert len(deferred) == len(reference) == 2
    for (x, y), (x_ref, y_ref) in zip(deferred, reference):
        assert x.dtype == torch.uint8 and x_ref.dtype == torch.float32 and x.shape == x_ref.shape
        # batched as (B, H, W, 3) memory, no transpose on the CPU: a channels_last view
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        assert torch.equal(normalize(x), x_ref)
        if isinstance(y, list) and y and isinstance(y[0], dict):
            assert all(torch.equal(a[k], b[k]) for a, b in zip(y, y_ref) for k in a)
        elif isinstance(y, torch.Tensor):
            assert torch.equal(y, y_ref)
        else:
            assert y == y_ref
    with pytest.raises(TypeError, match="uint8"):
        normalize(reference[0][0])


@pytest.mark.parametrize("task_name,arch,workers", [("classify", "resnet18", 0), ("segment", "unet", 2),
                                                    ("detect", "fasterrcnn", 0), ("multilabel", "resnet18", 0)])
def test_validation_on_uint8_batches_scores_what_float_batches_score(tmp_path, task_name, arch, workers):
    """On CUDA the val loader hands over uint8 batches too, and the engine gives the tasks'
    val_metrics (and the calibration) their images through DeviceBatches, normalised on the
    device: the same numbers as from a loader that normalises."""
    from visionflow.core.config import ModelParams
    from visionflow.training.loader import DeviceBatches

    samples = _shapes_samples(tmp_path, 6)
    if task_name in ("classify", "multilabel"):
        samples = [dataclasses.replace(s, instances=[], labels=[i % 2] if task_name == "classify" else [0, 1][:1 + i % 2])
                   for i, s in enumerate(samples)]
    small = {"unet": {"width": 0.25}, "fasterrcnn": {"backbone": "mobilenet_v2", "width": 0.5}}.get(arch, {})
    params = TrainParams(model=ModelParams(arch=arch, **small), image_size=64,
                         batch_size=4, num_workers=workers, device="cpu")
    task = get_task(task_name, params)
    torch.manual_seed(0)
    model = task.build_model(params, 2, pretrained=False).eval()

    def scored(on_device: bool):
        train_tf, eval_tf = task.build_transforms(params)
        train_ds, val_ds = task.build_dataset(samples, train_tf, tmp_path), task.build_dataset(samples, eval_tf, tmp_path)
        _, val_loader, _ = build_loaders(task, params, Paths(tmp_path), train_ds, val_ds, torch.device("cpu"), SINGLE,
                                         normalize_on_device=on_device)
        batches = DeviceBatches(val_loader, torch.device("cpu"), channels_last=False)
        assert (val_ds.device_normalize is not None) == on_device
        assert next(iter(val_loader))[0].dtype == (torch.uint8 if on_device else torch.float32)
        assert next(iter(batches))[0].dtype == torch.float32
        got = task.val_metrics(model, batches, torch.device("cpu"))
        if task_name == "multilabel":
            got.update(task.calibrate(model, batches, torch.device("cpu")))
        return got

    reference, deferred = scored(False), scored(True)
    assert reference == deferred and reference


def test_chw_tensor_copies_only_what_it_must_and_stack_keeps_channels_last_values():
    from visionflow.training.loader import chw_tensor, stack

    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    view = chw_tensor(hwc)  # deferred uint8: a view, channels-last strides
    assert view.shape == (3, 5, 7) and view.data_ptr() == hwc.ctypes.data and view.stride() == (1, 21, 3)
    hwc.flags.writeable = False  # a record no step changed: copied, with the same layout
    kept = chw_tensor(hwc)
    assert kept.data_ptr() != hwc.ctypes.data and kept.stride() == (1, 21, 3) and torch.equal(kept, view)
    planar = rng.random((3, 5, 7), dtype=np.float32)
    lut = chw_tensor(planar.transpose(1, 2, 0))  # the LUT's channel-first output: contiguous, no copy
    assert lut.is_contiguous() and lut.data_ptr() == planar.ctypes.data
    floats = rng.random((5, 7, 3), dtype=np.float32)
    copied = chw_tensor(floats)  # anything else: a contiguous copy
    assert copied.is_contiguous() and torch.equal(copied, torch.from_numpy(floats).permute(2, 0, 1))

    images = [chw_tensor(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)) for _ in range(4)]
    batch = stack(images)
    assert batch.shape == (4, 3, 5, 7) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([t.contiguous() for t in images]))
    assert stack([t.contiguous() for t in images]).is_contiguous()  # channel-first stays channel-first


def test_defer_normalization_leaves_a_pipeline_without_a_final_normalize_alone(tmp_path):
    import albumentations as A

    samples = _same_image_samples(tmp_path, 2)
    task = get_task("classify", _params())
    ds = task.build_dataset(samples, A.Compose([A.Resize(32, 32), A.HorizontalFlip(p=0.5)]), tmp_path)
    assert ds.defer_normalization() is None and ds.device_normalize is None
    x, _ = ds[(0, 1)]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    # a new transform keeps the deferral (a pipeline ending in A.Normalize is deferred again)
    normal = task.build_dataset(samples, task.build_transforms(_params())[0], tmp_path)
    normal.defer_normalization()
    normal.transform = task.build_transforms(_params(image_size=48))[0]
    assert normal.device_normalize is not None and normal[(0, 1)][0].dtype == torch.uint8


def test_training_on_uint8_batches_gives_the_weights_of_float_batches(tmp_path):
    """train_one_epoch applies the dataset's DeviceNormalize after the copy: the same losses and
    the same weights as a loader that normalises."""
    from visionflow.training.engine import FitConfig, build_optimizer, build_scheduler, train_one_epoch

    samples = _same_image_samples(tmp_path, 8)
    params = _params(num_workers=0, batch_size=4)
    task = get_task("classify", params)
    results = []
    for on_device in (False, True):
        _, train_loader, sampler = _train_loader(task, params, samples, tmp_path, on_device)
        torch.manual_seed(0)
        model = task.build_model(params, 8, pretrained=False)
        cfg = FitConfig(epochs=1, lr=1e-2, optimizer="sgd")
        optimizer = build_optimizer(model.parameters(), cfg)
        scheduler = build_scheduler(optimizer, 1, len(train_loader), 0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        sampler.set_epoch(3)
        losses = train_one_epoch(task, model, train_loader, optimizer, scheduler, scaler, torch.device("cpu"),
                                 None, None, 0)
        results.append((losses, model.state_dict()))
    (loss_a, state_a), (loss_b, state_b) = results
    assert {k: v for k, v in loss_a.items() if k.startswith("train_")} == \
        {k: v for k, v in loss_b.items() if k.startswith("train_")}  # data_wait, images_per_s: timings
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_channels_last_always_trains_nhwc_on_the_cpu(tmp_path):
    """train.channels_last: true is CUDA only; always puts the model and the batches in NHWC on
    the CPU too (oneDNN's faster layout for small_cnn and MobileNetV2)."""
    from visionflow.training.engine import FitConfig, build_optimizer, build_scheduler, train_one_epoch, \
        use_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_channels_last(True, cpu) and use_channels_last(True, cuda)
    assert use_channels_last("always", cpu) and not use_channels_last(False, cuda)
    samples = _same_image_samples(tmp_path, 8)
    params = _params(num_workers=0, batch_size=4, model=ModelParams(arch="small_cnn"), channels_last="always")
    task = get_task("classify", params)
    train_tf, eval_tf = task.build_transforms(params)
    train_ds = task.build_dataset(samples, train_tf, tmp_path)
    train_loader, _, sampler = build_loaders(task, params, Paths(tmp_path), train_ds,
                                             task.build_dataset(samples[:2], eval_tf, tmp_path), cpu, SINGLE)
    model = task.build_model(params, 8, pretrained=False).to(memory_format=torch.channels_last)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    cfg = FitConfig(epochs=1, lr=1e-2, optimizer="sgd")
    optimizer = build_optimizer(model.parameters(), cfg)
    sampler.set_epoch(1)
    losses = train_one_epoch(task, model, train_loader, optimizer, build_scheduler(optimizer, 1, 2, 0),
                             torch.amp.GradScaler("cpu", enabled=False), cpu, None, None, 0, params.channels_last)
    assert seen == [True, True] and np.isfinite(losses["train_loss"])
