"""Writing the canonical manifest back out in any format (`visionflow export-annotations`, alias `export`)."""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from visionflow.formats import ConversionReport, write_format
from visionflow.core.files import write_json
from visionflow.manifest import Sample, read_categories, read_manifest, read_split, samples_in_split
from visionflow.core.paths import Paths

log = logging.getLogger(__name__)

REPORT_FILE = "conversion_report.json"


def export_annotations(fmt: str, out: Path, paths: Paths, split: Optional[str] = None,
                       copy_images: bool = True) -> dict[str, Any]:
    """Write the manifest (or one split of it) as `fmt` into `out`, with a conversion report
    (`out/conversion_report.json`) counting whatever the format cannot hold.

    The project's split (split.json, once the split stage ran) travels with the samples as
    `attributes["split"]`, the key every reader fills and every writer that can hold a split
    writes (YOLO images/<split>/, VOC ImageSets/Main, CVAT subsets, split folders, ...), so
    the export reads back with the same split (split.keep_existing). Without a split file the
    samples keep the split their source had, if any."""
    samples = read_manifest(paths.manifest)
    if split:
        samples = samples_in_split(samples, paths.split_file, split)
    split_of = project_split(paths)
    if split_of:
        samples = [with_split(s, split_of.get(s.id)) for s in samples]
    categories = read_categories(paths.categories)
    report = ConversionReport()
    annotations = write_format(fmt, samples, categories, Path(out), paths.root, copy_images, report)
    summary = {"format": fmt, "samples": len(samples), "split": split,
               "splits": dict(sorted(Counter(s.attributes.get("split") or "none" for s in samples).items())),
               "annotations": str(annotations), "losses": report.to_dict(), "lossless": report.total == 0}
    write_json(Path(out) / REPORT_FILE, summary)
    for line in report.lines():
        log.warning("export %s cannot hold everything: %s", fmt, line)
    return summary


def project_split(paths: Paths) -> dict[str, str]:
    """{sample id: "train" | "val" | "test"} from split.json; empty before the split stage ran."""
    if not paths.split_file.exists():
        return {}
    return {sid: name for name, ids in read_split(paths.split_file).items() for sid in ids}


def with_split(s: Sample, split: Optional[str]) -> Sample:
    attributes = {k: v for k, v in s.attributes.items() if k != "split"}
    return dataclasses.replace(s, attributes={**attributes, "split": split} if split else attributes)
