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
from typing import Any, Optional

from visionflow.core.config import ConfigError, IngestParams, SourceParams
from visionflow.core.errors import DataError
from visionflow.formats import ConversionReport, FormatResult, read_source
from visionflow.core.files import atomic_path, read_json, safe_extract_zip, write_json
from visionflow.manifest import Category, Sample, write_categories, write_manifest
from visionflow.core.paths import Paths

log = logging.getLogger(__name__)


def ingest(params: IngestParams, paths: Paths, out_dir: Path | None = None) -> dict[str, Any]:
    """`out_dir`: write the manifest, category table and report there (same file names)
    instead of the pipeline's paths (`visionflow ingest --out DIR`)."""
    targets = (paths.manifest, paths.categories, paths.validation_report, paths.validation_metrics)
    if out_dir is not None:  # the full report only: the metrics file is the pipeline's
        targets = tuple(Path(out_dir) / p.name for p in targets[:3])
    resolved = [resolve_source(src, paths) for src in params.sources]
    results = [(src, _read(src, where, paths)) for src, where in zip(params.sources, resolved)]
    categories = merge_categories([(src.name, res.categories) for src, res in results])
    samples: list[Sample] = []
    report = ConversionReport()
    per_source = []
    for (src, res), where in zip(results, resolved):
        samples.extend(remap_sample(s, _id_map(categories, src.name)) for s in res.samples)
        report.merge(res.report)
        per_source.append(_source_summary(src, where, res, paths))
        _log_source(per_source[-1])

    n_instances = sum(len(s.instances) for s in samples)
    _log_problems(report)
    # Drops the user asked for (category mapped to null) are reported, but are not data problems.
    problems = report.total - report.counts.get("category_dropped", 0)
    if params.strict and problems:
        raise DataError(paths.params, f"ingest.strict is on and {problems} problem(s) were found:\n  "
                        + "\n  ".join(report.lines()), hint="fix the data or set ingest.strict: false")

    # All files are staged next to their targets and renamed only when every one of them
    # was written: a failure leaves the previous outputs as they were, never a mix.
    summary = {"samples": len(samples), "instances": n_instances, "categories": len(categories)}
    with contextlib.ExitStack() as stack:
        manifest, cats, validation, *metrics = (stack.enter_context(atomic_path(p)) for p in targets)
        write_manifest(manifest, samples)
        write_categories(cats, categories)
        if metrics:  # numbers only, one column each in `dvc metrics show`
            write_json(metrics[0], {**summary, "problems": report.total, "strict": params.strict,
                                    **{f"problem_{k}": n for k, n in sorted(report.counts.items())}})
        write_json(validation, {**summary, "problems": report.to_dict(), "strict": params.strict,
                                "sources": per_source})
    log.info("ingest: %d samples, %d instances, %d categories -> %s", len(samples), n_instances,
             len(categories), targets[0])
    return {"samples": len(samples), "instances": n_instances, "categories": len(categories),
            "problems": report.total, "sources": per_source}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where a source's data is and in which format: as given, or detected (`why` says how)."""
    format: str
    images: Path
    annotations: Path
    root: str  # Sample.root: the images root as the project names it (relative when inside)
    why: Optional[str] = None


def _as_given(path: Path, paths: Paths) -> str:
    try:
        return paths.rel(path)
    except ValueError:
        return path.as_posix()


def resolve_source(src: SourceParams, paths: Paths) -> Resolved:
    """The source's format, images root and annotations: `path` (a folder, file or .zip) or
    `annotations` without `format` are detected (visionflow.formats.detect), zips extracted
    safely to data/extracted/<name>/."""
    from visionflow.formats.detect import detect_source

    if src.path is None:
        images, annotations = paths.resolve(src.images), paths.resolve(src.annotations)
        if src.format is not None:
            return Resolved(src.format, images, annotations, src.images)
        found = detect_source(annotations)
        return Resolved(found.format, images, annotations, src.images, found.why)
    where = paths.resolve(src.path)
    if where.is_file() and where.suffix.lower() == ".zip":
        where = safe_extract_zip(where, paths.extracted_dir / src.name)
    found = detect_source(where, fmt=src.format)
    return Resolved(found.format, found.images, found.annotations, _as_given(found.images, paths), found.why)


def read_options(src: SourceParams, where: Resolved) -> dict[str, Any]:
    """The format's own reading options a source sets (voc: its coordinates convention)."""
    return {"coordinates": src.voc_coordinates} if where.format == "voc" else {}


def _read(src: SourceParams, where: Resolved, paths: Paths) -> FormatResult:
    options = read_options(src, where)
    if src.voc_coordinates != "auto" and where.format != "voc":
        raise ConfigError(f"{paths.params}: ingest source {src.name!r} sets voc_coordinates, but was read as "
                          f"{where.format} ({where.why or 'format given'}); remove it or fix the format")
    result = read_source(where.format, where.images, where.annotations, src.name, root=where.root, **options)
    _require_something(src, where, result)
    return apply_category_map(result, src.categories, src.name, paths.params) if src.categories else result


def _require_something(src: SourceParams, where: Resolved, res: FormatResult) -> None:
    """A source that gives no image, or images without a single label or object, trains
    nothing: stop with what was looked for and where (never exit 0 with an empty result)."""
    looked = f"read as {where.format} (images {where.images}, annotations {where.annotations})"
    if not res.samples:
        lost = ", ".join(f"{k} {n}" for k, n in sorted(res.report.counts.items())) or "none"
        raise DataError(where.annotations, f"source {src.name!r} {looked} gave no image (counted: {lost})",
                        hint="check the images folder and that the format is right; docs/formats.md lists "
                             "what each format expects")
    if not any(s.labels or s.instances for s in res.samples):
        lost = ", ".join(f"{k} {n}" for k, n in sorted(res.report.counts.items())) or "none"
        raise DataError(where.annotations, f"source {src.name!r} {looked}: {len(res.samples)} images but no "
                        f"label or object in any of them (counted as lost: {lost})",
                        hint="check the annotation path and format; an unlabelled folder is not a training set")


def _source_summary(src: SourceParams, where: Resolved, res: FormatResult, paths: Paths) -> dict[str, Any]:
    """What ingest detected, read and counted as lost for one source (validation report, CLI)."""
    summary = {"name": src.name, "format": where.format, "detected": where.why,
               "images": _as_given(where.images, paths), "annotations": _as_given(where.annotations, paths),
               "samples": len(res.samples), "instances": sum(len(s.instances) for s in res.samples),
               "categories": len(res.categories), "problems": dict(sorted(res.report.counts.items()))}
    if src.corrections:
        summary["corrections"] = corrections_summary(paths.resolve(src.corrections), paths)
    return summary


def corrections_summary(path: Path, paths: Paths) -> dict[str, Any]:
    """The relabelling behind a source's annotations (visionflow.relabel's corrections.json), in short."""
    if not path.is_file():
        raise DataError(paths.params, f"ingest source's corrections record {path} not found",
                        hint="it is written by `visionflow annotate --pull` beside the corrected annotations; "
                             "restore it or remove `corrections:` from the source")
    rec = read_json(path)
    if not isinstance(rec, dict) or not isinstance(rec.get("corrected"), int) or not isinstance(rec.get("review"), dict):
        raise DataError(path, "not a corrections record (expected `corrected` and `review`)",
                        hint="it is written by `visionflow annotate --pull`; do not edit it")
    return {"record": _as_given(path, paths), "version": rec.get("version"), "corrected": rec["corrected"],
            "reviewed": rec.get("reviewed"), "review": rec["review"]}


CATEGORY_DROPPED = "instance or image label dropped: its category is mapped to null in ingest.sources[].categories"


def apply_category_map(result: FormatResult, mapping: dict[str, str | None], source: str,
                       params_file: Path) -> FormatResult:
    """Rename source categories (several names may merge into one) or drop them (null).

    Runs before sources are merged, so merging by name then sees the renamed table. A merged
    category keeps the source id of its first member; the others are remapped to it."""
    known = {c.name for c in result.categories}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise DataError(params_file, f"ingest.sources[{source}].categories names {unknown}, which the source "
                        f"does not have", hint=f"the source's categories are {sorted(known)}")
    kept: dict[str, Category] = {}
    alias: dict[int, int] = {}
    for c in result.categories:
        target = mapping.get(c.name, c.name)
        if target is None:
            continue
        first = kept.setdefault(target, dataclasses.replace(c, name=target))
        alias[c.id] = first.id
    report = result.report
    report.policies.setdefault("category_dropped", CATEGORY_DROPPED)
    samples = []
    for s in result.samples:
        for inst in s.instances:
            if inst.category_id not in alias:
                report.add("category_dropped", f"{s.id}: instance of category id {inst.category_id}")
        for label in s.labels:
            if label not in alias:
                report.add("category_dropped", f"{s.id}: image label of category id {label}")
        samples.append(dataclasses.replace(
            s, labels=[alias[c] for c in s.labels if c in alias],
            instances=[dataclasses.replace(i, category_id=alias[i.category_id]) for i in s.instances
                       if i.category_id in alias]))
    return FormatResult(list(kept.values()), samples, report)


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


def _log_source(s: dict[str, Any]) -> None:
    if s["detected"]:
        log.info("source %s: detected %s (%s)", s["name"], s["format"], s["detected"])
    lost = ", ".join(f"{k} {n}" for k, n in s["problems"].items()) or "nothing"
    log.info("source %s (%s, images %s, annotations %s): %d images, %d instances, %d categories; counted: %s",
             s["name"], s["format"], s["images"], s["annotations"], s["samples"], s["instances"], s["categories"], lost)


def _log_problems(report: ConversionReport) -> None:
    for line in report.lines():
        log.warning("ingest problem: %s", line)
