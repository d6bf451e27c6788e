"""Multi-label CSV (Roboflow's "Multi-Label Classification" export) <-> canonical samples.

Layout (as Roboflow writes it; tests/data/real/roboflow-skinproblem is one such export):

    <root>/_classes.csv                 one table for a flat dataset, or
    <root>/train/_classes.csv           one per split folder (train, valid/val/validation, test),
    <root>/valid/_classes.csv             each naming the images of its own folder
    <root>/test/_classes.csv

    filename, Acne, Blackheads, Dark Spots, ...      header: a file column, then one column per class
    661_jpg.rf.0017f9.jpg, 1, 0, 0, ...              one row per image: 1 = the image shows the class

Reading maps:
    header columns after the first   -> Category; ids 0..K-1 in column order (spaces around names stripped)
    row                              -> Sample: path = the file name relative to the CSV's folder
                                        (`<split folder>/<file>` for a split export), labels = the
                                        classes marked 1 (none: an image that shows no class, kept)
    split folder                     -> Sample.attributes["split"] in {"train", "val", "test"}
`annotations` is one CSV file, whose file names are relative to `images`, or the export root
(then `images` is that root too, and each split's files are in its folder).

Validation policy (errors stop the read; counted problems are skipped and reported):

| problem                                             | policy                                        |
|-----------------------------------------------------|-----------------------------------------------|
| no CSV at the path, or a folder without _classes.csv | DataError naming the path and what was looked for |
| header without classes, empty or duplicate class     | DataError naming the file and column          |
| split tables with different classes                  | DataError naming both files                   |
| row with another number of cells than the header     | DataError naming the file and line            |
| cell other than 0 or 1                               | DataError naming the file, line and column    |
| file name unsafe (absolute, '..', backslash) or a    | DataError naming the file and line            |
|   symlink resolving outside the root; listed twice   |                                               |
| image_missing / image_unreadable (COMMON_POLICIES)   | row skipped, counted                          |

Writing: `out_dir/_classes.csv` with the images copied beside it at their manifest paths, or,
when every sample has a train/val/test split, one folder per split (Roboflow's names: train,
valid, test) each with its own `_classes.csv`. An image's classes are `Sample.labels`; what the
table cannot hold (objects, attributes, groups) is counted in the report (WRITE_POLICIES).
"""
from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

from visionflow.core.errors import DataError
from visionflow.core.files import write_with
from visionflow.formats import (COMMON_POLICIES, ConversionReport, FormatResult, check_inside, copy_image, probe,
                                safe_relpath)
from visionflow.manifest import SPLIT_FOLDERS, Category, Sample

TABLE = "_classes.csv"
WRITE_FOLDERS = {"train": "train", "val": "valid", "test": "test"}  # Roboflow's split folder names
WRITE_POLICIES: dict[str, str] = {
    "instances_dropped": "objects (boxes, polygons, masks) are not written: the table holds image classes only",
    "attributes_dropped": "sample attributes other than the split are not written",
    "group_dropped": "sample group is not written",
    "split_dropped": "split not written (not every sample has one, so the table is flat)",
}


def read_labels_csv(images_root: Path, annotations: Path, source: str, root: Optional[str] = None) -> FormatResult:
    annotations = Path(annotations)
    tables = _tables(annotations)
    report = ConversionReport(dict(COMMON_POLICIES))
    names: Optional[list[str]] = None
    first: Optional[Path] = None
    samples: list[Sample] = []
    seen: set[str] = set()
    for table, split in tables:
        header, rows = _read_table(table)
        if names is None:
            names, first = header, table
        elif header != names:
            raise DataError(table, f"its classes {header} differ from {first}'s {names}",
                            hint="every split of one export must list the same classes")
        # a split export's file names are relative to their own folder, inside the images root
        prefix = table.parent.relative_to(annotations).as_posix() if annotations.is_dir() else "."
        folder = Path(images_root) / prefix if split else Path(images_root)
        for line, (name, marks) in rows:
            where = f"{table} line {line}"
            try:
                rel = safe_relpath(name)
                path = check_inside(folder, rel)
            except ValueError as exc:
                raise DataError(table, str(exc), record=f"line {line}") from None
            path_rel = f"{prefix}/{rel}" if split else rel
            if path_rel in seen:
                raise DataError(table, f"{name!r} is listed twice", record=f"line {line}")
            seen.add(path_rel)
            probed = probe(path, (None, None), report, where)
            if probed is None:
                continue
            width, height, sha = probed
            sid = f"{source}/{path_rel}"
            samples.append(Sample(id=sid, root=root if root is not None else Path(images_root).as_posix(),
                                  path=path_rel, width=width, height=height, sha256=sha,
                                  labels=[k for k, m in enumerate(marks) if m], group=sid,
                                  attributes={"split": split} if split else {}))
    categories = [Category(k, n, source_ids={source: k}) for k, n in enumerate(names or [])]
    return FormatResult(categories, samples, report)


def _tables(annotations: Path) -> list[tuple[Path, Optional[str]]]:
    """(CSV file, split or None) for a CSV file, a folder holding _classes.csv, or a split export."""
    if annotations.is_file():
        return [(annotations, None)]
    if not annotations.is_dir():
        raise DataError(annotations, "not found", hint="point annotations at a _classes.csv file or its export folder")
    if (annotations / TABLE).is_file():
        return [(annotations / TABLE, None)]
    splits = sorted((d / TABLE, SPLIT_FOLDERS[d.name.lower()]) for d in annotations.iterdir()
                    if d.is_dir() and d.name.lower() in SPLIT_FOLDERS and (d / TABLE).is_file())
    if not splits:
        raise DataError(annotations, f"no {TABLE} here nor in a train/valid/test folder",
                        hint="a multi-label CSV export has _classes.csv beside its images")
    return splits


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, tuple[str, list[bool]]]]]:
    """(class names, [(line, (file name, marks))]) of one CSV."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc})") from None
    reader = csv.reader(text.splitlines(), skipinitialspace=True)
    header = [c.strip() for c in next(reader, [])]
    if len(header) < 2:
        raise DataError(path, "the header names no class (expected: filename, class, class, ...)", record="line 1")
    names = header[1:]
    for col, name in enumerate(names, 2):
        if not name:
            raise DataError(path, f"column {col} of the header has no class name", record="line 1")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(path, f"class {dup[0]!r} is listed twice in the header", record="line 1")
    rows = []
    for line, cells in enumerate(reader, 2):
        if not cells or not "".join(cells).strip():
            continue
        if len(cells) != len(header):
            raise DataError(path, f"{len(cells)} cells, the header has {len(header)}", record=f"line {line}")
        marks = []
        for col, cell in enumerate(cells[1:], 2):
            value = cell.strip()
            if value not in ("0", "1"):
                raise DataError(path, f"column {col} ({names[col - 2]!r}) is {value!r}, not 0 or 1",
                                record=f"line {line}")
            marks.append(value == "1")
        rows.append((line, (cells[0].strip(), marks)))
    return names, rows


def write_labels_csv(samples: Iterable[Sample], categories: list[Category], out_dir: Path,
              project_root: Path = Path("."), copy_images: bool = True,
              report: Optional[ConversionReport] = None) -> Path:
    """Write `_classes.csv` (per split folder when every sample has a split); returns the root
    table, or the export folder for a split export."""
    out_dir, project_root = Path(out_dir), Path(project_root)
    report = report if report is not None else ConversionReport()
    report.policies.update(WRITE_POLICIES)
    samples = list(samples)
    ordered = sorted(categories, key=lambda c: c.id)
    column = {c.id: j for j, c in enumerate(ordered)}
    splits = [s.attributes.get("split") for s in samples]
    by_split = bool(samples) and all(sp in WRITE_FOLDERS for sp in splits)
    tables: dict[str, list[list[str]]] = {}
    for s, split in zip(samples, splits):
        _count_losses(s, report, by_split)
        folder = WRITE_FOLDERS[split] if by_split else "."
        rel = _name_in(s.path, folder)
        if copy_images:
            copy_image(s, out_dir / folder / rel, project_root)
        marks = ["0"] * len(ordered)
        for k in s.labels:
            if k not in column:
                raise ValueError(f"{s.id}: label {k} is not in the category table")
            marks[column[k]] = "1"
        tables.setdefault(folder, []).append([rel, *marks])
    header = ["filename", *(c.name for c in ordered)]
    for folder, rows in (tables or {".": []}).items():
        write_with(out_dir / folder / TABLE, lambda tmp, rows=rows: tmp.write_text(
            "".join(", ".join(r) + "\n" for r in [header, *rows]), encoding="utf-8"))
    return out_dir if by_split else out_dir / TABLE


def _name_in(path: str, folder: str) -> str:
    """A sample's path inside its split folder (a path read from a split export starts with it)."""
    parts = PurePosixPath(path).parts
    if folder != "." and len(parts) > 1 and SPLIT_FOLDERS.get(parts[0].lower()) == SPLIT_FOLDERS.get(folder):
        return PurePosixPath(*parts[1:]).as_posix()
    return path


def _count_losses(s: Sample, report: ConversionReport, by_split: bool) -> None:
    if s.instances:
        report.add("instances_dropped", f"{s.id}: {len(s.instances)} objects")
    extra = sorted(s.attributes.keys() - {"split"})
    if extra:
        report.add("attributes_dropped", f"{s.id}: {extra}")
    if s.group and s.group != s.id:
        report.add("group_dropped", f"{s.id}: group {s.group!r}")
    if s.attributes.get("split") and not by_split:
        report.add("split_dropped", f"{s.id}: split {s.attributes['split']!r}")
