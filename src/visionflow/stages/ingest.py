"""Ingest stage: every annotated source -> one canonical manifest, category table and report.

Sources are read by their format module (visionflow.formats), then merged: categories are
matched by NAME across sources and renumbered 0..K-1 in order of first appearance (source
order, then each source's own category order); `Category.source_ids` keeps the mapping.
All outputs are written only after everything was read and checked, so a failed ingest
leaves the previous outputs untouched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

from visionflow.config import IngestParams, SourceParams
from visionflow.errors import DataError
from visionflow.formats import ConversionReport, FormatResult, read_source
from visionflow.io import atomic_path, write_json
from visionflow.manifest import Category, Sample, write_categories, write_manifest
from visionflow.paths import Paths

log = logging.getLogger(__name__)


def ingest(params: IngestParams, paths: Paths) -> dict[str, Any]:
    results = [(src, _read(src, paths)) for src in params.sources]
    categories = merge_categories([(src.name, res.categories) for src, res in results])
    samples: list[Sample] = []
    report = ConversionReport()
    for src, res in results:
        samples.extend(remap_sample(s, _id_map(categories, src.name)) for s in res.samples)
        report.merge(res.report)
        _log_source(src, res)

    n_instances = sum(len(s.instances) for s in samples)
    _log_problems(report)
    if params.strict and report.total:
        raise DataError(paths.params, f"ingest.strict is on and {report.total} problem(s) were found:\n  "
                        + "\n  ".join(report.lines()), hint="fix the data or set ingest.strict: false")

    # All three files are staged next to their targets and renamed only when every one of
    # them was written: a failure leaves the previous outputs as they were, never a mix.
    with contextlib.ExitStack() as stack:
        manifest, cats, validation = (stack.enter_context(atomic_path(p))
                                      for p in (paths.manifest, paths.categories, paths.validation_report))
        write_manifest(manifest, samples)
        write_categories(cats, categories)
        write_json(validation, {
            "samples": len(samples), "instances": n_instances, "categories": len(categories),
            "problems": report.to_dict(), "strict": params.strict,
        })
    log.info("ingest: %d samples, %d instances, %d categories -> %s", len(samples), n_instances,
             len(categories), paths.manifest)
    return {"samples": len(samples), "instances": n_instances, "categories": len(categories),
            "problems": report.total}


def _read(src: SourceParams, paths: Paths) -> FormatResult:
    return read_source(src.format, _resolve(src.images, paths), _resolve(src.annotations, paths), src.name,
                       root=src.images)


def _resolve(p: str, paths: Paths) -> Path:
    path = Path(p)
    return path if path.is_absolute() else paths.root / path


def merge_categories(tables: list[tuple[str, list[Category]]]) -> list[Category]:
    """Union of source category tables by name, ids 0..K-1 in first-appearance order."""
    by_name: dict[str, dict[str, Any]] = {}
    for source, cats in tables:
        for c in cats:
            entry = by_name.setdefault(c.name, {"supercategory": c.supercategory, "source_ids": {}})
            if not entry["supercategory"]:
                entry["supercategory"] = c.supercategory
            entry["source_ids"][source] = c.id
    return [Category(id=i, name=name, supercategory=e["supercategory"], source_ids=e["source_ids"])
            for i, (name, e) in enumerate(by_name.items())]


def _id_map(categories: list[Category], source: str) -> dict[int, int]:
    """Source category id -> canonical id."""
    return {c.source_ids[source]: c.id for c in categories if source in c.source_ids}


def remap_sample(s: Sample, ids: dict[int, int]) -> Sample:
    return dataclasses.replace(
        s, labels=[ids[c] for c in s.labels],
        instances=[dataclasses.replace(i, category_id=ids[i.category_id]) for i in s.instances])


def _log_source(src: SourceParams, res: FormatResult) -> None:
    log.info("source %s (%s): %d images, %d instances, %d categories, %d problem(s)", src.name, src.format,
             len(res.samples), sum(len(s.instances) for s in res.samples), len(res.categories), res.report.total)


def _log_problems(report: ConversionReport) -> None:
    for line in report.lines():
        log.warning("ingest problem: %s", line)
