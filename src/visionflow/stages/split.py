"""Split stage: deterministic, stratified, group-aware, duplicate-aware train/val/test assignment.

Unit of assignment is the UNIT: the union (union-find) of samples sharing a group key and of
duplicate images, so frames of one clip, images of one patient and copies of one picture can
never leak from train into test. The group key is `Sample.group` (default the sample id), or,
with `split.group_by`, `{regex: ...}` on `Sample.path` (first capture group, else the whole
match) or `{attribute: name}` from `Sample.attributes`. Duplicates: equal sha256 always, and
perceptual-hash neighbours within `split.near_duplicate_threshold` bits (visionflow.manifest.dedup).

Samples whose split is fixed (`split.from_file`, else `Sample.attributes["split"]` with
`split.keep_existing`) keep it; an unfixed sample of a unit with fixed members follows them.
The rest is split by the ratios:

- stratify_by label (classification; `auto` picks it when any sample has an image label):
  units are stratified by their majority class (`manifest.image_label`). Within a stratum the
  units are shuffled with a RNG seeded by (seed, stratum), each split with a nonzero ratio
  first receives one unit, the rest go one by one to the split furthest below its target.
- stratify_by instances (detection/segmentation; `auto` when no sample has an image label):
  iterative stratification (Sechidis et al. 2011) on per-class instance counts: take the
  class with the fewest unassigned instances, give each unit holding it (seeded order) to the
  split lacking that class, else with the largest remaining demand for it, else for images;
  repeat. Multi-label images count towards every class they hold.
- none: units go to the split furthest below its target number of images.

The result depends only on the seed, the parameters and the set of samples, not on manifest
order. The leakage check then fails the stage if a group or a duplicate pair straddles splits
(possible only when fixed splits force it) and names them.

Problem -> policy:
    group_by regex does not match a path / attribute missing -> the sample is its own group; counted
    fixed split value not train/val/test (aliases valid, validation, training, testing, dev) -> DataError
    split file missing, unparsable, or a row without id,split -> DataError naming file and line/id
    split file names an id not in the manifest -> counted (`fixed.from_file_unknown`), warned
    group or duplicate pair straddles splits (fixed splits disagree) -> DataError naming them
    image unreadable for near-duplicate search -> counted (`duplicates.unhashed`), sha256 only
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from visionflow.core.config import SplitParams
from visionflow.manifest.dedup import DuplicatePair, Duplicates, UnionFind, find_duplicates
from visionflow.core.errors import DataError
from visionflow.core.files import atomic_path, write_json
from visionflow.manifest import SPLITS, Sample, image_label, read_categories, read_manifest, write_split
from visionflow.core.paths import Paths

log = logging.getLogger(__name__)
UNLABELLED = "(unlabelled)"
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}
MAX_NAMED = 5  # straddles named in the leakage error


def split(params: SplitParams, paths: Paths) -> dict[str, int]:
    samples = read_manifest(paths.manifest)
    names = {c.id: c.name for c in read_categories(paths.categories)}
    keys, unmatched = group_keys(samples, params.group_by)
    dups = find_duplicates(samples, paths.root, params.near_duplicate_threshold)
    fixed, fixed_counts = fixed_splits(samples, params, paths.root, paths.manifest)
    units = merge_units(samples, keys, dups.pairs)
    mode = stratify_mode(samples, params)
    splits = assign_splits(samples, {"train": params.train, "val": params.val, "test": params.test},
                           params.seed, mode, units=units, fixed=fixed)
    check_leakage(splits, samples, paths.split_file, groups=keys, pairs=dups.pairs, fixed=fixed)
    _refuse_empty(splits, params, paths, len(samples), len(set(units.values())), dups)
    _warn_missing_classes(samples, splits, params, names)
    report = split_report(samples, splits, params.seed, names, groups=keys, duplicates=dups)
    report.update(stratify_by=mode, grouping={"group_by": params.group_by, "unmatched": unmatched,
                                              "units": len(set(units.values()))}, fixed=fixed_counts)
    with contextlib.ExitStack() as stack:
        split_tmp, report_tmp, metrics_tmp = (stack.enter_context(atomic_path(p))
                                              for p in (paths.split_file, paths.split_report, paths.split_metrics))
        write_split(split_tmp, splits, params.seed)
        write_json(metrics_tmp, report_numbers(report))
        write_json(report_tmp, report)
    counts = {k: len(splits[k]) for k in SPLITS}
    log.info("split (seed %d, %s): %s; %d exact and %d near duplicate pairs kept together", params.seed, mode,
             ", ".join(f"{k} {n}" for k, n in counts.items()), report["duplicates"]["exact_pairs"],
             report["duplicates"]["near_pairs"])
    return counts


def group_of(s: Sample) -> str:
    return s.group or s.id


# --- grouping ---

def group_keys(samples: list[Sample], group_by: Optional[dict[str, str]]) -> tuple[dict[str, str], int]:
    """sample id -> group key, and how many samples fell back to their own id."""
    if not group_by:
        return {s.id: group_of(s) for s in samples}, 0
    keys, unmatched = {}, 0
    rx = re.compile(group_by["regex"]) if "regex" in group_by else None
    for s in samples:
        if rx is not None:
            m = rx.search(s.path)
            key = (m.group(1) if m.re.groups and m.group(1) is not None else m.group(0)) if m else None
        else:
            value = s.attributes.get(group_by["attribute"])
            key = None if value is None or value == "" else str(value)
        keys[s.id] = key or s.id
        unmatched += not key
    if unmatched:
        log.warning("split.group_by %s: %d of %d samples have no group key; each is its own group",
                    group_by, unmatched, len(samples))
    return keys, unmatched


def merge_units(samples: list[Sample], keys: dict[str, str], pairs: list[DuplicatePair]) -> dict[str, str]:
    """sample id -> unit (smallest sample id of the unit): groups joined through duplicates."""
    uf = UnionFind(s.id for s in samples)
    first: dict[str, str] = {}
    for s in sorted(samples, key=lambda s: s.id):
        uf.union(first.setdefault(keys[s.id], s.id), s.id)
    for p in pairs:
        uf.union(p.a, p.b)
    return {s.id: uf.find(s.id) for s in samples}


# --- fixed splits ---

def fixed_splits(samples: list[Sample], params: SplitParams, root: Path = Path("."),
                 manifest: Any = "manifest") -> tuple[dict[str, str], dict[str, int]]:
    """sample id -> split fixed by the split file (wins) or the source's own split."""
    fixed: dict[str, str] = {}
    counts = {"keep_existing": 0, "from_file": 0, "from_file_unknown": 0}
    if params.keep_existing:
        for s in samples:
            value = s.attributes.get("split")
            if value is not None:
                fixed[s.id] = _split_name(value, manifest, s.id, "attributes.split")
        counts["keep_existing"] = len(fixed)
    if params.from_file:
        path = Paths(root).resolve(params.from_file)
        listed = read_split_file(path)
        ids = {s.id for s in samples}
        unknown = sorted(set(listed) - ids)
        if unknown:
            log.warning("%s: %d ids are not in the manifest (first: %s); ignored", path, len(unknown), unknown[0])
        known = {i: v for i, v in listed.items() if i in ids}
        fixed.update(known)
        counts.update(from_file=len(known), from_file_unknown=len(unknown))
    return fixed, counts


def read_split_file(path: Path) -> dict[str, str]:
    """A JSON {id: split} (or this stage's own split.json) or a CSV of id,split rows."""
    if not path.exists():
        raise DataError(path, "split file not found", hint="fix split.from_file or set it to null")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        out = {}
        for lineno, row in enumerate(csv.reader(text.splitlines()), 1):
            if not row or (lineno == 1 and [c.strip().lower() for c in row] == ["id", "split"]):
                continue
            if len(row) != 2:
                raise DataError(path, f"expected 2 columns id,split, got {len(row)}", record=f"line {lineno}")
            out[row[0].strip()] = _split_name(row[1], path, f"line {lineno}", row[0])
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON ({exc})", hint="write {id: split} or CSV id,split") from None
    if isinstance(data, dict) and isinstance(data.get("splits"), dict):  # a split.json of an earlier run
        data = {i: name for name, ids in data["splits"].items() for i in ids}
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object {id: split}", hint="or a CSV file of id,split rows")
    return {str(i): _split_name(v, path, str(i), "split") for i, v in data.items()}


def _split_name(value: Any, where: Any, record: str, what: str) -> str:
    name = SPLIT_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise DataError(where, f"{what} {value!r} is not a split", record=record,
                        hint=f"use one of {', '.join(SPLITS)}")
    return name


# --- assignment ---

def stratify_mode(samples: list[Sample], params: SplitParams) -> str:
    if not params.stratify or params.stratify_by == "none":
        return "none"
    if params.stratify_by != "auto":
        return params.stratify_by
    return "label" if any(s.labels for s in samples) or not any(s.instances for s in samples) else "instances"


def assign_splits(samples: list[Sample], ratios: dict[str, float], seed: int, stratify: bool | str = True,
                  units: Optional[dict[str, str]] = None, fixed: Optional[dict[str, str]] = None
                  ) -> dict[str, list[str]]:
    """split name -> sorted sample ids. `stratify`: True/"label", "instances", False/"none";
    `units`: sample id -> unit (default its group); `fixed`: sample id -> split it must keep."""
    mode = {True: "label", False: "none"}.get(stratify, stratify)  # type: ignore[call-overload]
    fixed = fixed or {}
    groups: dict[str, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.id):
        groups.setdefault(units[s.id] if units else group_of(s), []).append(s)
    where: dict[str, str] = {}  # sample id -> split
    free = []
    for key in sorted(groups):
        pinned = Counter(fixed[s.id] for s in groups[key] if s.id in fixed)
        if not pinned:
            free.append(key)
            continue
        follow = min(pinned, key=lambda n: (-pinned[n], SPLITS.index(n)))  # unfixed members follow the majority
        where.update((s.id, fixed.get(s.id, follow)) for s in groups[key])
    active = [k for k in SPLITS if ratios.get(k, 0) > 0]
    chosen = (_assign_by_instances if mode == "instances" else _assign_by_label)(
        {k: groups[k] for k in free}, ratios, active, seed, mode == "label")
    for key, name in chosen.items():
        where.update((s.id, name) for s in groups[key])
    splits: dict[str, list[str]] = {k: [] for k in SPLITS}
    for sid, name in where.items():
        splits[name].append(sid)
    return {k: sorted(v) for k, v in splits.items()}


def _assign_by_label(groups: dict[str, list[Sample]], ratios: dict[str, float], active: list[str], seed: int,
                     stratify: bool) -> dict[str, str]:
    strata: dict[Optional[int], list[str]] = {}
    for key in sorted(groups):
        cls = _majority_class(groups[key]) if stratify else None
        strata.setdefault(cls, []).append(key)
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
    return chosen


def _assign_by_instances(groups: dict[str, list[Sample]], ratios: dict[str, float], active: list[str],
                         seed: int, _stratify: bool = True) -> dict[str, str]:
    """Iterative stratification (Sechidis et al. 2011) of units by per-class instance counts."""
    counts = {k: Counter(i.category_id for s in g for i in s.instances if not i.iscrowd) for k, g in groups.items()}
    order = sorted(groups)
    random.Random(f"{seed}:instances").shuffle(order)
    remaining = Counter()
    for c in counts.values():
        remaining.update(c)
    demand = {k: {cls: ratios[k] * n for cls, n in remaining.items()} for k in active}  # instances still wanted
    demand_images = {k: ratios[k] * sum(len(g) for g in groups.values()) for k in active}
    have = {k: Counter() for k in active}
    chosen: dict[str, str] = {}

    def give(key: str, name: str) -> None:
        chosen[key] = name
        demand_images[name] -= len(groups[key])
        for cls, n in counts[key].items():
            demand[name][cls] -= n
            have[name][cls] += n
            remaining[cls] -= n

    while +remaining:  # the class with the fewest unassigned instances first: rare classes get placed
        cls = min(+remaining, key=lambda c: (remaining[c], c))
        for key in order:
            if key not in chosen and counts[key][cls]:
                give(key, max(active, key=lambda k: (have[k][cls] == 0, demand[k][cls], demand_images[k])))
    for key in order:  # units without instances balance the image counts
        if key not in chosen:
            give(key, max(active, key=lambda k: demand_images[k]))
    # Serving rare classes first can leave a split with no unit at all on a tiny dataset (4
    # photos of 8 classes came out 3 / 1 / 0). With enough units each split gets one, taken from
    # the split furthest over its image target (its smallest unit).
    members = {k: [key for key in order if chosen[key] == k] for k in active}
    total = sum(len(g) for g in groups.values())
    for name in active:
        donors = [k for k in active if len(members[k]) > 1]
        if members[name] or not donors:
            continue
        donor = max(donors, key=lambda k: sum(len(groups[u]) for u in members[k]) - ratios[k] * total)
        unit = min(members[donor], key=lambda u: len(groups[u]))
        members[donor].remove(unit)
        members[name].append(unit)
        chosen[unit] = name
    return chosen


def _majority_class(members: list[Sample]) -> Optional[int]:
    votes = Counter(image_label(s) for s in members)
    # Most common; ties go to the smallest class id, unlabelled last, so the choice is stable.
    return min(votes, key=lambda c: (-votes[c], c is None, c if c is not None else 0))


# --- leakage check ---

def check_leakage(splits: dict[str, list[str]], samples: list[Sample], where: Any = "split",
                  groups: Optional[dict[str, str]] = None, pairs: list[DuplicatePair] = (),
                  fixed: Optional[dict[str, str]] = None) -> None:
    """Raise DataError if a sample is in two splits, or a group or a duplicate pair straddles
    splits; the message names the first few and, when fixed splits caused it, what to change."""
    by_id = {s.id: s for s in samples}
    split_of: dict[str, str] = {}
    for name in sorted(splits):
        for sid in splits[name]:
            if sid in split_of:
                raise DataError(where, f"sample is in both {split_of[sid]} and {name}", record=sid)
            split_of[sid] = name
    problems: list[tuple[str, str, str]] = []  # (description, id a, id b)
    first_of_group: dict[str, str] = {}
    for sid in sorted(split_of):
        group = groups.get(sid, sid) if groups else (group_of(by_id[sid]) if sid in by_id else sid)
        other = first_of_group.setdefault(group, sid)
        if split_of[other] != split_of[sid]:
            problems.append((f"group {group!r} straddles splits: {other} in {split_of[other]}, "
                             f"{sid} in {split_of[sid]}", other, sid))
    for p in pairs:
        if p.a in split_of and p.b in split_of and split_of[p.a] != split_of[p.b]:
            problems.append((f"{p.reason} duplicate pair (distance {p.distance}) straddles splits: "
                             f"{p.a} in {split_of[p.a]}, {p.b} in {split_of[p.b]}", p.a, p.b))
    if not problems:
        return
    forced = [d for d, a, b in problems if fixed and (a in fixed or b in fixed)]
    hint = ("the fixed splits put them apart: set split.keep_existing: false or split.from_file: null, "
            "or fix the source's split" if forced else "samples sharing a group or duplicates must share a split")
    named = "; ".join(d for d, _, _ in problems[:MAX_NAMED])
    more = f" (and {len(problems) - MAX_NAMED} more)" if len(problems) > MAX_NAMED else ""
    raise DataError(where, f"{len(problems)} leaks: {named}{more}", record=problems[0][1], hint=hint)


# --- report ---

def split_report(samples: list[Sample], splits: dict[str, list[str]], seed: int, names: dict[int, str],
                 groups: Optional[dict[str, str]] = None, duplicates: Optional[Duplicates] = None) -> dict[str, Any]:
    by_id = {s.id: s for s in samples}
    out: dict[str, Any] = {"seed": seed, "splits": {}}
    for name in SPLITS:
        members = [by_id[i] for i in splits.get(name, [])]
        per_class = Counter(_class_name(image_label(s), names) for s in members)
        instances = Counter(_class_name(i.category_id, names) for s in members for i in s.instances)
        out["splits"][name] = {"images": len(members), "per_class": dict(sorted(per_class.items())),
                               "instances": dict(sorted(instances.items())),
                               "groups": len({groups[s.id] if groups else group_of(s) for s in members})}
    out["duplicates"] = (duplicates or Duplicates()).summary()
    return out


def report_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """The split report without its per-class tables, one level deep (metrics/split.json: a
    column each in `dvc metrics show`, whatever the number of classes)."""
    out: dict[str, Any] = {"seed": report["seed"], "stratify_by": report.get("stratify_by")}
    for name, s in report["splits"].items():
        out.update({f"{name}_images": s["images"], f"{name}_instances": sum(s["instances"].values()),
                    f"{name}_groups": s["groups"]})
    for block in ("duplicates", "grouping", "fixed"):
        for k, v in (report.get(block) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{block}_{k}"] = v
    return out


def _class_name(cls: Optional[int], names: dict[int, str]) -> str:
    return UNLABELLED if cls is None else names.get(cls, str(cls))


def _refuse_empty(splits: dict[str, list[str]], params: SplitParams, paths: Paths, n_samples: int,
                  n_units: int, dups: Duplicates) -> None:
    """Training needs a train split and evaluation a test split (both fractions are above 0):
    refused here, before anything is written, not two stages later. When the images form fewer
    groups than the splits to fill, the grouping is the cause, and the message says which."""
    empty = [name for name in ("train", "test") if not splits[name]]
    if not empty:
        return
    asked = ", ".join(f"split.{name} {getattr(params, name)}" for name in empty)
    units = f" in {n_units} group{'s' if n_units != 1 else ''} kept together" if n_units < n_samples else ""
    what = f"{n_samples} samples{units} leave the {' and '.join(empty)} split empty ({asked})"
    wanted = sum(getattr(params, name) > 0 for name in SPLITS)
    if not n_units < wanted <= n_samples:  # enough groups, or too few images whatever the grouping
        raise DataError(paths.manifest, f"{what}; training needs at least one image in train and evaluation "
                        "one in test", hint="add images, or raise " + " and ".join(f"split.{n}" for n in empty)
                        + ", then run split again")
    counted = dups.summary(n_examples=0)
    near, exact = counted["near_pairs"], counted["exact_pairs"]
    causes = ([f"{near} near-duplicate pair{'s' if near > 1 else ''} (pHash within split.near_duplicate_threshold "
               f"{dups.threshold} bits; frames of one video look like this)"] if near else []) + \
        ([f"{exact} exact duplicate pair{'s' if exact > 1 else ''}"] if exact else []) + \
        ([f"split.group_by {params.group_by}"] if params.group_by else [])
    options = (["lower split.near_duplicate_threshold (0 turns it off, and near-copies of test images may then "
                "be in train)"] if near else []) + (["change split.group_by"] if params.group_by else [])
    raise DataError(paths.manifest, f"{what}: {' and '.join(causes) or 'the grouping'} keep them together, "
                    f"so they cannot fill {wanted} splits",
                    hint="add images of other scenes" + "".join(f"; or {o}" for o in options) + "; then run split again")


def _warn_missing_classes(samples: list[Sample], splits: dict[str, list[str]], params: SplitParams,
                          names: dict[int, str]) -> None:
    """Grouping can make the every-class-in-every-split promise impossible; say so loudly."""
    mode = stratify_mode(samples, params)
    if mode == "none":
        return
    # label: the image's class; instances: every class it holds an instance of
    label = {s.id: ({image_label(s)} if mode == "label" else {i.category_id for i in s.instances}) for s in samples}
    sizes = Counter(c for classes in label.values() for c in classes)
    for name in SPLITS:
        if getattr(params, name) <= 0:
            continue
        present = set().union(*(label[i] for i in splits[name]))
        for cls, n in sizes.items():
            if cls is not None and n >= 3 and cls not in present:
                log.warning("class %s (%d samples) has no sample in %s: its samples share too few groups",
                            _class_name(cls, names), n, name)
