"""Split stage: deterministic, stratified, group-aware train/val/test assignment.

Unit of assignment is the GROUP (`Sample.group`, default the sample id): every sample of a
group lands in the same split, so near-duplicates (frames of one video, crops of one photo)
cannot leak from train into test. Groups are stratified by their majority class
(`manifest.image_label`; unlabelled samples form their own stratum). Within a stratum the
groups are shuffled with a RNG seeded by (seed, stratum), each split with a nonzero ratio
first receives one group (so a class with at least as many groups as splits appears in every
split), and the rest go one by one to the split furthest below its target number of images.
The result depends only on the seed and the set of samples, not on manifest order.
"""
from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from typing import Any, Optional

from visionflow.config import SplitParams
from visionflow.errors import DataError
from visionflow.io import atomic_path, write_json
from visionflow.manifest import SPLITS, Sample, image_label, read_categories, read_manifest, write_split
from visionflow.paths import Paths

log = logging.getLogger(__name__)
UNLABELLED = "(unlabelled)"


def split(params: SplitParams, paths: Paths) -> dict[str, int]:
    samples = read_manifest(paths.manifest)
    names = {c.id: c.name for c in read_categories(paths.categories)}
    splits = assign_splits(samples, {"train": params.train, "val": params.val, "test": params.test},
                           params.seed, params.stratify)
    check_leakage(splits, samples, paths.split_file)
    _warn_missing_classes(samples, splits, params, names)
    report = split_report(samples, splits, params.seed, names)
    with contextlib.ExitStack() as stack:
        split_tmp, report_tmp = (stack.enter_context(atomic_path(p)) for p in (paths.split_file, paths.split_report))
        write_split(split_tmp, splits, params.seed)
        write_json(report_tmp, report)
    counts = {k: len(splits[k]) for k in SPLITS}
    log.info("split (seed %d): %s", params.seed, ", ".join(f"{k} {n}" for k, n in counts.items()))
    return counts


def group_of(s: Sample) -> str:
    return s.group or s.id


def assign_splits(samples: list[Sample], ratios: dict[str, float], seed: int,
                  stratify: bool = True) -> dict[str, list[str]]:
    """split name -> sorted sample ids."""
    groups: dict[str, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.id):
        groups.setdefault(group_of(s), []).append(s)
    strata: dict[Optional[int], list[str]] = {}
    for key in sorted(groups):
        cls = _majority_class(groups[key]) if stratify else None
        strata.setdefault(cls, []).append(key)

    active = [k for k in SPLITS if ratios.get(k, 0) > 0]
    total = sum(len(g) for g in groups.values())
    global_target = {k: ratios[k] * total for k in active}
    global_count = dict.fromkeys(active, 0)
    chosen: dict[str, str] = {}
    for cls in sorted(strata, key=lambda c: (c is None, c if c is not None else 0)):
        keys = strata[cls]
        random.Random(f"{seed}:{cls}").shuffle(keys)  # str seeds hash with sha512: stable everywhere
        size = sum(len(groups[k]) for k in keys)
        count = dict.fromkeys(active, 0)
        for i, key in enumerate(keys):
            if i < len(active):
                name = active[i]  # one group per split first, so the class is in every split
            else:  # largest shortfall in this stratum, ties to the largest shortfall overall
                name = max(active, key=lambda k: (ratios[k] * size - count[k],
                                                  global_target[k] - global_count[k]))
            chosen[key] = name
            count[name] += len(groups[key])
            global_count[name] += len(groups[key])

    splits: dict[str, list[str]] = {k: [] for k in SPLITS}
    for key, name in chosen.items():
        splits[name].extend(s.id for s in groups[key])
    return {k: sorted(v) for k, v in splits.items()}


def _majority_class(members: list[Sample]) -> Optional[int]:
    votes = Counter(image_label(s) for s in members)
    # Most common; ties go to the smallest class id, unlabelled last, so the choice is stable.
    return min(votes, key=lambda c: (-votes[c], c is None, c if c is not None else 0))


def check_leakage(splits: dict[str, list[str]], samples: list[Sample], where: Any = "split") -> None:
    """Raise DataError if a sample is in two splits or a group straddles splits."""
    by_id = {s.id: s for s in samples}
    split_of_sample: dict[str, str] = {}
    split_of_group: dict[str, tuple[str, str]] = {}
    for name in sorted(splits):
        for sid in splits[name]:
            if sid in split_of_sample:
                raise DataError(where, f"sample is in both {split_of_sample[sid]} and {name}", record=sid)
            split_of_sample[sid] = name
            group = group_of(by_id[sid]) if sid in by_id else sid
            first = split_of_group.setdefault(group, (name, sid))
            if first[0] != name:
                raise DataError(where, f"group {group!r} straddles splits: {first[1]} in {first[0]}, "
                                f"{sid} in {name}", record=f"group {group}",
                                hint="samples sharing a group must share a split")


def split_report(samples: list[Sample], splits: dict[str, list[str]], seed: int,
                 names: dict[int, str]) -> dict[str, Any]:
    by_id = {s.id: s for s in samples}
    out: dict[str, Any] = {"seed": seed, "splits": {}}
    for name in SPLITS:
        members = [by_id[i] for i in splits.get(name, [])]
        per_class = Counter(_class_name(image_label(s), names) for s in members)
        out["splits"][name] = {"images": len(members), "per_class": dict(sorted(per_class.items())),
                               "groups": len({group_of(s) for s in members})}
    return out


def _class_name(cls: Optional[int], names: dict[int, str]) -> str:
    return UNLABELLED if cls is None else names.get(cls, str(cls))


def _warn_missing_classes(samples: list[Sample], splits: dict[str, list[str]], params: SplitParams,
                          names: dict[int, str]) -> None:
    """Grouping can make the every-class-in-every-split promise impossible; say so loudly."""
    if not params.stratify:
        return
    label = {s.id: image_label(s) for s in samples}
    sizes = Counter(label.values())
    for name in SPLITS:
        if getattr(params, name) <= 0:
            continue
        present = {label[i] for i in splits[name]}
        for cls, n in sizes.items():
            if cls is not None and n >= 3 and cls not in present:
                log.warning("class %s (%d samples) has no sample in %s: its samples share too few groups",
                            _class_name(cls, names), n, name)
