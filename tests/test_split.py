"""The split stage on hand-made manifests (no images needed: split reads only the manifest)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from visionflow.config import SplitParams
from visionflow.errors import DataError
from visionflow.io import read_json
from visionflow.manifest import (SPLITS, Category, Instance, Sample, image_label, read_split, write_categories,
                                 write_manifest)
from visionflow.paths import Paths
from visionflow.stages.split import assign_splits, check_leakage, split

NAMES = ["circle", "square", "triangle", "rare"]


def sample(i: int, cls: int | None, group: str = "", by_box: bool = False) -> Sample:
    sid = f"src/{i:04d}.png"
    labels, instances = ([cls], []) if cls is not None and not by_box else ([], [])
    if by_box and cls is not None:  # class from the largest instance, not an image label
        instances = [Instance(bbox=[0, 0, 5, 5], category_id=(cls + 1) % 3),
                     Instance(bbox=[0, 0, 30, 30], category_id=cls)]
    return Sample(id=sid, root="data", path=f"{i:04d}.png", width=64, height=64, sha256="0" * 64,
                  labels=labels, instances=instances, group=group or sid)


def dataset() -> list[Sample]:
    """60 + 30 + 20 labelled images, 3 of a rare class, 5 unlabelled; some by instance."""
    out, i = [], 0
    for cls, n in [(0, 60), (1, 30), (2, 20), (3, 3), (None, 5)]:
        for k in range(n):
            out.append(sample(i, cls, by_box=(k % 4 == 0)))
            i += 1
    return out


def grouped_dataset() -> list[Sample]:
    """Groups of 1-4 images (say, frames of one clip), mostly one class per group."""
    rng = random.Random(5)
    out, i = [], 0
    for g in range(50):
        cls = g % 3
        for _ in range(rng.randint(1, 4)):
            out.append(sample(i, cls if rng.random() > 0.1 else (cls + 1) % 3, group=f"clip-{g}"))
            i += 1
    return out


def write_project(tmp_path, samples: list[Sample]) -> Paths:
    paths = Paths(tmp_path)
    write_manifest(paths.manifest, samples)
    write_categories(paths.categories, [Category(i, n) for i, n in enumerate(NAMES)])
    return paths


def run(tmp_path, samples, **kw) -> dict[str, list[str]]:
    paths = write_project(tmp_path, samples)
    split(SplitParams(**kw), paths)
    return read_split(paths.split_file)


def test_outputs_written_where_paths_says(tmp_path):
    paths = write_project(tmp_path, dataset())
    counts = split(SplitParams(seed=3), paths)
    splits = read_split(paths.split_file)
    assert counts == {k: len(splits[k]) for k in SPLITS} and sum(counts.values()) == 118
    report = read_json(paths.split_report)
    assert report["seed"] == 3 and read_json(paths.split_file)["seed"] == 3
    for name in SPLITS:
        entry = report["splits"][name]
        assert entry["images"] == counts[name] == sum(entry["per_class"].values()) == entry["groups"]
    assert report["splits"]["train"]["per_class"]["(unlabelled)"] >= 1
    assert set(report["splits"]["test"]["per_class"]) >= {"circle", "square", "triangle", "rare"}


def test_every_sample_assigned_exactly_once(tmp_path):
    samples = dataset()
    splits = run(tmp_path, samples)
    ids = [i for k in SPLITS for i in splits[k]]
    assert sorted(ids) == sorted(s.id for s in samples)


def test_deterministic_per_seed(tmp_path):
    samples = dataset()
    a = run(tmp_path / "a", samples, seed=0)
    b = run(tmp_path / "b", samples, seed=0)
    c = run(tmp_path / "c", samples, seed=1)
    assert a == b and a != c


def test_independent_of_manifest_order(tmp_path):
    samples = grouped_dataset()
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    assert run(tmp_path / "a", samples, seed=4) == run(tmp_path / "b", shuffled, seed=4)


@pytest.mark.parametrize("seed", range(5))
def test_stratified_every_class_in_every_split(seed):
    samples = dataset()
    splits = assign_splits(samples, {"train": 0.7, "val": 0.15, "test": 0.15}, seed)
    label = {s.id: image_label(s) for s in samples}
    for name in SPLITS:
        classes = {label[i] for i in splits[name]}
        assert {0, 1, 2, 3} <= classes, (name, classes)  # "rare" has exactly 3 samples
    # per-class proportions follow the ratios too (60 circles: 42/9/9 within one image)
    circles = Counter(name for name in SPLITS for i in splits[name] if label[i] == 0)
    assert abs(circles["train"] - 42) <= 1 and abs(circles["val"] - 9) <= 1


@pytest.mark.parametrize("ratios", [(0.7, 0.15, 0.15), (0.8, 0.1, 0.1), (0.5, 0.25, 0.25), (0.6, 0.0, 0.4)])
def test_ratios_within_rounding(ratios):
    samples = dataset()
    r = dict(zip(SPLITS, ratios))
    splits = assign_splits(samples, r, seed=2)
    n_strata = 5  # rounding can cost at most about one image per stratum
    for name in SPLITS:
        assert abs(len(splits[name]) - r[name] * len(samples)) <= n_strata, (name, len(splits[name]))
    if r["val"] == 0:
        assert splits["val"] == []


def test_groups_stay_together(tmp_path):
    samples = grouped_dataset()
    splits = run(tmp_path, samples, seed=7)
    where = {i: name for name in SPLITS for i in splits[name]}
    groups: dict[str, set[str]] = {}
    for s in samples:
        groups.setdefault(s.group, set()).add(where[s.id])
    assert all(len(v) == 1 for v in groups.values())
    assert all(splits[k] for k in SPLITS)
    check_leakage(splits, samples)  # and the stage's own check agrees


def test_leakage_check_names_the_straddling_group():
    samples = [sample(0, 0, group="clip-9"), sample(1, 0, group="clip-9"), sample(2, 1)]
    splits = {"train": [samples[0].id, samples[2].id], "val": [samples[1].id], "test": []}
    with pytest.raises(DataError, match="clip-9") as err:
        check_leakage(splits, samples, "split.json")
    assert "straddles" in str(err.value) and "split.json" in str(err.value)


def test_leakage_check_rejects_a_sample_in_two_splits():
    samples = [sample(0, 0), sample(1, 1)]
    splits = {"train": [samples[0].id], "val": [], "test": [samples[0].id, samples[1].id]}
    with pytest.raises(DataError, match=r"src/0000.png.*both"):
        check_leakage(splits, samples)


def test_stratify_off_still_keeps_groups(tmp_path):
    samples = grouped_dataset()
    splits = assign_splits(samples, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0, stratify=False)
    check_leakage(splits, samples)
    assert sum(map(len, splits.values())) == len(samples)

