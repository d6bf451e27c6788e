"""The split stage on hand-made manifests (no images needed: split reads only the manifest)."""
from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from visionflow.core.config import SplitParams
from visionflow.manifest.dedup import DuplicatePair
from visionflow.core.errors import DataError
from visionflow.core.files import read_json
from visionflow.manifest import (SPLITS, Category, Instance, Sample, image_label, read_split, write_categories,
                                 write_manifest)
from visionflow.core.paths import Paths
from visionflow.stages.split import assign_splits, check_leakage, split

NAMES = ["circle", "square", "triangle", "rare"]


def sample(i: int, cls: int | None, group: str = "", by_box: bool = False) -> Sample:
    sid = f"src/{i:04d}.png"
    labels, instances = ([cls], []) if cls is not None and not by_box else ([], [])
    if by_box and cls is not None:  # class from the largest instance, not an image label
        instances = [Instance(bbox=[0, 0, 5, 5], category_id=(cls + 1) % 3),
                     Instance(bbox=[0, 0, 30, 30], category_id=cls)]
    return Sample(id=sid, root="data", path=f"{i:04d}.png", width=64, height=64, sha256=f"{i:064x}",
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
    # the DVC metric: the same numbers, flat (one column each in `dvc metrics show`), no class names
    numbers = read_json(paths.split_metrics)
    assert all(isinstance(v, (int, float, str)) for v in numbers.values()) and len(numbers) < 30, numbers
    assert {numbers[f"{k}_images"] for k in SPLITS} == {counts[k] for k in SPLITS}
    assert numbers["seed"] == 3 and not any("circle" in k for k in numbers)


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



# --- grouping, duplicates, instance stratification, fixed splits ---

def det_sample(i: int, classes: list[int], path: str = "", **kw) -> Sample:
    """An image with one box per class in `classes` and no image-level label (detection)."""
    path = path or f"{i:04d}.png"
    return Sample(id=f"src/{path}", root="data", path=path, width=64, height=64, sha256=f"{i:064x}",
                  instances=[Instance(bbox=[0, 0, 10 + k, 10 + k], category_id=c) for k, c in enumerate(classes)],
                  **kw)


def multilabel_dataset() -> list[Sample]:
    """300 detection images with 1-3 boxes of classes 0-2, 8 holding the rare class 3."""
    rng = random.Random(11)
    out = [det_sample(i, [rng.choice([0, 0, 0, 1, 1, 2]) for _ in range(rng.randint(1, 3))]) for i in range(300)]
    for i in range(0, 300, 38):  # class 3 rides along in multi-label images
        out[i].instances.append(Instance(bbox=[5, 5, 9, 9], category_id=3))
    return out


def where_is(splits: dict[str, list[str]]) -> dict[str, str]:
    return {i: name for name in SPLITS for i in splits[name]}


@pytest.mark.parametrize("seed", range(3))
def test_instance_stratification_keeps_class_proportions(tmp_path, seed):
    samples = multilabel_dataset()
    paths = write_project(tmp_path, samples)
    split(SplitParams(seed=seed), paths)  # auto: no image labels, so by instances
    report = read_json(paths.split_report)
    assert report["stratify_by"] == "instances"
    inst = {name: report["splits"][name]["instances"] for name in SPLITS}
    for cls in NAMES:
        total = sum(inst[name].get(cls, 0) for name in SPLITS)
        for name, ratio in zip(SPLITS, (0.7, 0.15, 0.15)):
            assert inst[name].get(cls, 0) >= 1, (cls, name)  # every class in every split
            if total > 50:
                assert abs(inst[name][cls] / total - ratio) < 0.04, (cls, name, inst[name][cls], total)
    images = {name: report["splits"][name]["images"] for name in SPLITS}
    assert abs(images["train"] - 210) <= 10


def test_instance_stratification_is_deterministic_and_order_free():
    samples = multilabel_dataset()
    shuffled = samples[:]
    random.Random(3).shuffle(shuffled)
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    a = assign_splits(samples, ratios, 5, "instances")
    assert a == assign_splits(shuffled, ratios, 5, "instances") != assign_splits(samples, ratios, 6, "instances")


def test_a_tiny_instance_dataset_still_gets_an_image_in_every_split():
    """The vendored CVAT COCO export's shape: 4 photos, 8 classes, most of them in one photo.
    Serving rare classes first once left test empty (3 / 1 / 0); now each split gets one."""
    samples = [det_sample(0, [0, 1, 2, 2, 2]), det_sample(1, [3, 4, 4]), det_sample(2, [5, 6, 0]),
               det_sample(3, [7, 1, 1, 1, 1])]
    for seed in range(10):
        splits = assign_splits(samples, {"train": 0.5, "val": 0.25, "test": 0.25}, seed, "instances")
        assert sorted(len(splits[name]) for name in SPLITS) == [1, 1, 2], (seed, splits)
        assert len(splits["train"]) == 2, (seed, splits)


def test_a_split_left_empty_is_refused_before_anything_is_written(tmp_path):
    samples = [sample(0, 0), sample(1, 1)]  # two images cannot fill three splits
    paths = write_project(tmp_path, samples)
    with pytest.raises(DataError, match=r"manifest.jsonl: 2 samples leave the test split empty \(split.test 0.15\);"
                                        r".*\(add images, or raise split.test, then run split again\)"):
        split(SplitParams(), paths)
    assert not paths.split_file.exists() and not paths.split_report.exists()


def test_a_split_left_empty_by_the_grouping_names_the_grouping(tmp_path):
    """Frames of one video: every image a (near-)copy of another, so one group that no split
    fraction can divide. The message says so, not 'raise split.test'."""
    import dataclasses

    samples = [dataclasses.replace(sample(i, i % 2), sha256="ab" * 32) for i in range(6)]  # 5 exact pairs
    paths = write_project(tmp_path, samples)
    with pytest.raises(DataError, match=r"6 samples in 1 group kept together leave the test split empty "
                                        r"\(split.test 0.15\): 5 exact duplicate pairs keep them together, so they "
                                        r"cannot fill 3 splits \(add images of other scenes; then run split again\)"):
        split(SplitParams(), paths)
    samples = [sample(i, i % 2) for i in range(6)]
    paths = write_project(tmp_path / "grouped", samples)
    with pytest.raises(DataError, match=r"6 samples in 1 group kept together .*: split.group_by \{'regex': .*\} "
                                        r"keep them together.*; or change split.group_by; then run split again"):
        split(SplitParams(group_by={"regex": r"(\d{3})\d\.png$"}, near_duplicate_threshold=0), paths)
    assert not paths.split_file.exists()


def test_a_split_left_empty_by_near_duplicates_says_which_threshold_to_lower(tmp_path):
    """Five frames of one scene (one image a little brighter each time): near duplicates."""
    frames = [sample(i, i % 2) for i in range(5)]
    write_images(tmp_path / "data", frames[:1])
    first = Image.open(tmp_path / "data" / frames[0].path).convert("RGB")
    for k, s in enumerate(frames[1:], 1):
        ImageEnhance.Brightness(first).enhance(1 + 0.02 * k).save(tmp_path / "data" / s.path)
    paths = write_project(tmp_path, frames)
    with pytest.raises(DataError, match=r"5 samples in 1 group kept together .*: \d+ near-duplicate pairs \(pHash "
                                        r"within split.near_duplicate_threshold 4 bits; frames of one video look like "
                                        r"this\) keep them together, so they cannot fill 3 splits \(add images of "
                                        r"other scenes; or lower split.near_duplicate_threshold \(0 turns it off"):
        split(SplitParams(), paths)
    split(SplitParams(near_duplicate_threshold=0), paths)  # what the message says to do works
    assert sorted(i for ids in read_split(paths.split_file).values() for i in ids) == [s.id for s in frames]


def test_regex_groups_never_straddle_and_unmatched_are_counted(tmp_path):
    samples = [det_sample(i, [i % 3], path=f"patient{i % 17:02d}/scan{i:03d}.png") for i in range(120)]
    samples += [det_sample(200 + i, [i % 3], path=f"loose/{i}.png") for i in range(4)]
    paths = write_project(tmp_path, samples)
    split(SplitParams(seed=1, group_by={"regex": r"^(patient\d+)/"}), paths)
    at = where_is(read_split(paths.split_file))
    for p in range(17):
        assert len({at[s.id] for s in samples if s.path.startswith(f"patient{p:02d}/")}) == 1
    report = read_json(paths.split_report)
    assert report["grouping"]["unmatched"] == 4 and report["grouping"]["units"] == 17 + 4
    assert sum(report["splits"][k]["groups"] for k in SPLITS) == 21


def test_attribute_groups_never_straddle(tmp_path):
    samples = [sample(i, i % 3, group=f"own-{i}") for i in range(90)]
    for s in samples:
        s.attributes["patient"] = int(s.path[:4]) % 11
    splits = run(tmp_path, samples, seed=2, group_by={"attribute": "patient"})
    at = where_is(splits)
    for p in range(11):
        assert len({at[s.id] for s in samples if s.attributes["patient"] == p}) == 1
    assert all(splits[k] for k in SPLITS)


def write_images(root, samples: list[Sample]) -> None:
    """Distinct random smooth images for each sample (so none are near duplicates)."""
    root.mkdir(parents=True, exist_ok=True)
    for k, s in enumerate(samples):
        rng = np.random.default_rng(100 + k)
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).resize(
            (64, 64), Image.Resampling.BICUBIC).save(root / s.path)


@pytest.mark.parametrize("seed", range(4))
def test_exact_and_near_duplicates_land_in_one_split(tmp_path, seed):
    samples = [sample(i, i % 3) for i in range(60)]
    write_images(tmp_path / "data", samples)
    # 0000.png is copied three ways: same bytes (exact), re-encoded as JPEG, brightened (near)
    orig = Image.open(tmp_path / "data" / "0000.png").convert("RGB")
    orig.save(tmp_path / "data" / "reencoded.jpg", quality=75)
    ImageEnhance.Brightness(orig).enhance(1.08).save(tmp_path / "data" / "bright.png")
    copies = [Sample(id="src/exact.png", root="data", path="0000.png", width=64, height=64,
                     sha256=samples[0].sha256, labels=[1], group="x1"),
              Sample(id="src/reencoded.jpg", root="data", path="reencoded.jpg", width=64, height=64,
                     sha256="e" * 64, labels=[2], group="x2"),
              Sample(id="src/bright.png", root="data", path="bright.png", width=64, height=64,
                     sha256="b" * 64, labels=[0], group="x3")]
    paths = write_project(tmp_path, samples + copies)
    split(SplitParams(seed=seed), paths)
    at = where_is(read_split(paths.split_file))
    assert len({at[i] for i in ["src/0000.png", *(c.id for c in copies)]}) == 1
    dups = read_json(paths.split_report)["duplicates"]
    assert dups["exact_pairs"] == 1 and dups["near_pairs"] >= 2 and dups["images_in_clusters"] == 4
    named = {e["a"] for e in dups["examples"]} | {e["b"] for e in dups["examples"]}
    assert named == {"src/0000.png", "src/exact.png", "src/reencoded.jpg", "src/bright.png"}  # no other image


def test_keep_existing_honours_the_source_split(tmp_path):
    samples = [sample(i, i % 3) for i in range(100)]
    for s in samples[:40]:
        s.attributes["split"] = ["train", "valid", "test", "train"][int(s.path[:4]) % 4]
    splits = run(tmp_path, samples, seed=0, keep_existing=True)
    at = where_is(splits)
    for s in samples[:40]:
        assert at[s.id] == {"valid": "val"}.get(s.attributes["split"], s.attributes["split"])
    rest = Counter(at[s.id] for s in samples[40:])
    assert abs(rest["train"] - 42) <= 3 and rest["val"] >= 6 and rest["test"] >= 6
    assert read_json(Paths(tmp_path).split_report)["fixed"]["keep_existing"] == 40
    # off (the default), the attribute is ignored and the ratios apply to all
    default = assign_splits(samples, {"train": 0.7, "val": 0.15, "test": 0.15}, 0)
    assert run(tmp_path / "off", samples, seed=0) == default


@pytest.mark.parametrize("kind", ["json", "csv", "split.json"])
def test_from_file_honoured(tmp_path, kind):
    samples = [sample(i, i % 3) for i in range(50)]
    wanted = {s.id: SPLITS[k % 3] for k, s in enumerate(samples[:15])}
    file = tmp_path / ("fixed.csv" if kind == "csv" else "fixed.json")
    if kind == "csv":
        file.write_text("id,split\n" + "".join(f"{i},{v}\n" for i, v in wanted.items()) + "src/gone.png,test\n")
    elif kind == "json":
        file.write_text(json.dumps({**wanted, "src/gone.png": "test"}))
    else:
        listed = {k: [i for i, v in wanted.items() if v == k] for k in SPLITS}
        listed["test"].append("src/gone.png")
        file.write_text(json.dumps({"splits": listed}))  # a split.json of an earlier run
    at = where_is(run(tmp_path, samples, seed=0, from_file=file.name))  # relative to the project root
    assert all(at[i] == v for i, v in wanted.items())
    assert read_json(Paths(tmp_path).split_report)["fixed"] == {"keep_existing": 0, "from_file": 15,
                                                                "from_file_unknown": 1}


def test_from_file_bad_rows_name_file_and_line(tmp_path):
    samples = [sample(i, 0) for i in range(5)]
    (tmp_path / "bad.csv").write_text("id,split\nsrc/0000.png,train\nsrc/0001.png,holdout\n")
    with pytest.raises(DataError, match=r"bad.csv \[line 3\].*'holdout' is not a split"):
        run(tmp_path, samples, from_file="bad.csv")
    (tmp_path / "short.csv").write_text("src/0000.png\n")
    with pytest.raises(DataError, match=r"short.csv \[line 1\].*2 columns"):
        run(tmp_path, samples, from_file="short.csv")
    with pytest.raises(DataError, match=r"nope.json.*not found"):
        run(tmp_path, samples, from_file="nope.json")


def test_keep_existing_that_splits_a_group_fails_naming_it(tmp_path):
    samples = [sample(i, i % 2, group="clip-1" if i < 2 else "") for i in range(20)]
    samples[0].attributes["split"], samples[1].attributes["split"] = "train", "test"
    with pytest.raises(DataError, match=r"clip-1.*src/0000.png in train, src/0001.png in test") as err:
        run(tmp_path, samples, keep_existing=True)
    assert "keep_existing: false" in str(err.value)


def test_keep_existing_that_splits_duplicates_fails_naming_the_pair(tmp_path):
    samples = [sample(i, i % 2) for i in range(20)]
    samples[5].sha256 = samples[4].sha256  # the source put one picture in both train and val
    samples[4].attributes["split"], samples[5].attributes["split"] = "train", "val"
    with pytest.raises(DataError, match=r"exact duplicate pair.*src/0004.png in train, src/0005.png in val") as err:
        run(tmp_path, samples, keep_existing=True, near_duplicate_threshold=0)
    assert "keep_existing: false" in str(err.value)


def test_leakage_check_names_a_straddling_near_duplicate_pair():
    samples = [sample(0, 0), sample(1, 1)]
    pair = DuplicatePair(samples[0].id, samples[1].id, "near", 2)
    splits = {"train": [samples[0].id], "val": [samples[1].id], "test": []}
    with pytest.raises(DataError, match=r"near duplicate pair \(distance 2\).*0000.png in train.*0001.png in val"):
        check_leakage(splits, samples, "split.json", pairs=[pair])


def test_all_options_on_is_deterministic(tmp_path):
    samples = multilabel_dataset()
    for s in samples:
        s.attributes["patient"] = int(s.path[:4]) % 40
    samples[7].sha256 = samples[8].sha256
    kw = dict(seed=9, group_by={"attribute": "patient"}, near_duplicate_threshold=0)
    a, b = run(tmp_path / "a", samples, **kw), run(tmp_path / "b", samples[::-1], **kw)
    assert a == b
    at = where_is(a)
    assert at[samples[7].id] == at[samples[8].id]
