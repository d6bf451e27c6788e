"""Writing the canonical manifest back out in any format (`visionflow export-annotations`, alias `export`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from visionflow.formats import ConversionReport, write_format
from visionflow.core.files import write_json
from visionflow.manifest import read_categories, read_manifest, samples_in_split
from visionflow.core.paths import Paths

log = logging.getLogger(__name__)

REPORT_FILE = "conversion_report.json"


def export_annotations(fmt: str, out: Path, paths: Paths, split: Optional[str] = None,
                       copy_images: bool = True) -> dict[str, Any]:
    """Write the manifest (or one split of it) as `fmt` into `out`, with a conversion report
    (`out/conversion_report.json`) counting whatever the format cannot hold."""
    samples = read_manifest(paths.manifest)
    if split:
        samples = samples_in_split(samples, paths.split_file, split)
    categories = read_categories(paths.categories)
    report = ConversionReport()
    annotations = write_format(fmt, samples, categories, Path(out), paths.root, copy_images, report)
    summary = {"format": fmt, "samples": len(samples), "split": split, "annotations": str(annotations),
               "losses": report.to_dict(), "lossless": report.total == 0}
    write_json(Path(out) / REPORT_FILE, summary)
    for line in report.lines():
        log.warning("export %s cannot hold everything: %s", fmt, line)
    return summary
