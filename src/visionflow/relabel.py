"""Close the loop (`visionflow annotate`, docs/relabel.md): send the review's most likely label
mistakes to an annotation tool, take the person's corrections back as a new version of the
source's annotations, and point ingest at it.

    push  review.json's top N test samples -> Label Studio (a server: project, tasks, predictions)
          or an import package (labelstudio-files: tasks.json; cvat-files: CVAT for images 1.1),
          each task showing our current labels (pre-annotation) and the model's prediction beside
          them; what was sent is kept in reports/<task>/annotate.json for the pull.
    pull  the tool's answers -> canonical samples (the format readers ingest uses) -> the task's
          `apply_correction` on the source's own samples -> data/corrections/<source>/v<N>/: the
          whole source written again in its own format (the original is never touched), read
          back and compared sample by sample before anything else changes -> params.yaml's source
          points at it (and carries the corrections record) -> dvc.yaml regenerated.

What a pull never does: change a sample nobody submitted (no annotation, or only a skipped one, is
"not reviewed"), drop what the tool never showed (an unchanged box keeps its mask), or write a
version that does not read back as intended.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from visionflow.core.config import BranchParams, Params, SourceParams, load_params
from visionflow.core.errors import DataError, UserError
from visionflow.core.files import file_digest, read_json, write_json, write_text
from visionflow.core.paths import Paths
from visionflow.formats import ConversionReport, read_source, write_format
from visionflow.formats.labelstudio import (WRITE_POLICIES, label_config, load_tasks, local_file_url, read_labelstudio,
                                            sample_results)
from visionflow.manifest import Category, Sample, read_categories, read_manifest

log = logging.getLogger(__name__)

BACKENDS = ("labelstudio", "labelstudio-files", "cvat-files")
CURRENT_LABELS = "current labels"  # the pre-annotation's model_version: what the annotator starts from
DEFAULT_URL = "http://127.0.0.1:8080"
PACKAGE_IMAGES = "images"


# --- what to send ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Pick:
    sample: Sample
    row: dict[str, Any]  # the review.json row: id, score, reason, rank
    record: Optional[dict[str, Any]]  # the test prediction


def picks(paths: Paths, top: int) -> list[Pick]:
    """The `top` most likely mistakes of the task's last review, with their samples and predictions."""
    from visionflow.stages.inspect import read_predictions

    if not paths.review.exists():
        raise UserError(f"{paths.review} not found: run the review first (`visionflow stage review-{paths.task}`, "
                        "or `visionflow run` / `dvc repro`)")
    review = read_json(paths.review)
    by_id = {s.id: s for s in read_manifest(paths.manifest)}
    categories = read_categories(paths.categories)
    predictions = read_predictions(paths.predictions, len(categories), paths.task) if paths.predictions.exists() else {}
    rows = [r for r in review.get("samples", []) if r.get("id") in by_id]
    stale = len(review.get("samples", [])) - len(rows)
    if stale:
        log.warning("annotate: %d reviewed samples are no longer in the manifest (re-run the review)", stale)
    if not rows:
        raise DataError(paths.review, "no reviewed sample is in the manifest", hint=f"re-run `visionflow stage "
                        f"review-{paths.task}` after ingest")
    return [Pick(by_id[r["id"]], r, predictions.get(r["id"])) for r in rows[:top]]


def review_ref(paths: Paths) -> dict[str, Any]:
    """Which review (and of which model) produced a relabelling: kept with the corrections."""
    review = read_json(paths.review)
    ref = {"task": paths.task, "report": paths.rel(paths.review), "sha256": file_digest(paths.review),
           "ranked_by": review.get("ranked_by")}
    if paths.registration.exists():
        reg = read_json(paths.registration)
        if reg.get("model_name") and reg.get("version"):
            ref["model"] = f"models:/{reg['model_name']}/{reg['version']}"
    return ref


def _model_label(ref: dict[str, Any]) -> str:
    return f"model {ref['model']}" if "model" in ref else f"model ({ref['task']})"


def ls_task(task, pick: Pick, names: dict[int, str], settings: Any, image: str, model_label: str) -> dict[str, Any]:
    """One Label Studio task: the current labels as the pre-annotation, the model's view beside it."""
    report = ConversionReport(dict(WRITE_POLICIES))
    s, row = pick.sample, pick.row
    predictions = [{"model_version": CURRENT_LABELS, "score": 1.0,
                    "result": sample_results(task.label_view(s), names, report, prefix="L", origin="prediction")}]
    if pick.record is not None:
        view = task.prediction_view(s, pick.record, settings)
        predictions.append({"model_version": model_label, "score": round(float(row["score"]), 6),
                            "result": sample_results(view, names, report, prefix="P", origin="prediction")})
    return {"data": {"image": image, "visionflow_id": s.id, "review_rank": row.get("rank"),
                     "review_score": row.get("score"), "review_reason": f"#{row.get('rank')}: {row.get('reason')}"},
            "predictions": predictions}


def project_config(task, categories: list[Category]) -> str:
    return label_config([c.name for c in categories], controls=task.relabel_controls, single_choice=task.single_choice,
                        header="$review_reason")


# --- push ------------------------------------------------------------------------------------------

def annotate(paths: Paths, branch: BranchParams, top: int, backend: str, out: Optional[Path] = None,
             url: Optional[str] = None, document_root: Optional[Path] = None) -> dict[str, Any]:
    from visionflow.tasks import get_task

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: one of {', '.join(BACKENDS)}")
    task = get_task(paths.task)
    chosen = picks(paths, top)
    categories = read_categories(paths.categories)
    names = {c.id: c.name for c in categories}
    ref = review_ref(paths)
    session: dict[str, Any] = {"task": paths.task, "backend": backend, "created": _now(), "review": ref,
                               "top": top, "samples": []}
    if backend == "labelstudio":
        from visionflow.integrations.labelstudio import LabelStudio

        url = url or os.environ.get("LABEL_STUDIO_URL") or DEFAULT_URL
        root = Path(document_root or os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT") or paths.root).resolve()
        client = LabelStudio(url, os.environ.get("LABEL_STUDIO_API_KEY", ""))
        tasks, folders = [], []
        for p in chosen:
            image = p.sample.image_path(paths.root).resolve()
            if not image.is_relative_to(root):
                raise UserError(f"{image} is outside the Label Studio document root {root}: start the server with "
                                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to a folder that holds the project's "
                                "images (and pass --document-root), or use --backend labelstudio-files")
            rel = image.relative_to(root).as_posix()
            folder = image.parents[len(Path(p.sample.path).parts) - 1]  # the source's images root
            if folder not in folders:
                folders.append(folder)
            tasks.append(ls_task(task, p, names, branch.review, local_file_url(rel), _model_label(ref)))
            session["samples"].append({"id": p.sample.id, "image": rel, "rank": p.row.get("rank")})
        title = f"visionflow {paths.task} review {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"
        description = (f"The {len(tasks)} {paths.task} test samples the review ranks most likely mislabelled "
                       f"({ref['report']}). Each starts from its current labels; the model's view is the "
                       f"other prediction. Correct what is wrong and Submit; Skip leaves a sample as it is.")
        project = client.create_project(title, project_config(task, categories), description, CURRENT_LABELS)
        for n, folder in enumerate(folders, 1):
            client.add_local_storage(project, str(folder), f"visionflow images {n}")
        client.import_tasks(project, tasks)
        session.update(url=client.url, project=project, document_root=str(root), server=client.version())
        where = client.project_url(project)
    else:
        out = Path(out) if out is not None else paths.root / "data" / "annotate" / paths.task / backend
        session["out"] = str(out.resolve())
        where = _write_package(backend, out, task, chosen, categories, names, branch, ref, paths, session)
    write_json(paths.annotate_session, session)
    return {"task": paths.task, "backend": backend, "sent": len(chosen), "where": where,
            "session": paths.rel(paths.annotate_session), "review": ref}


def _package_name(n: int, s: Sample) -> str:
    return f"{n:04d}-{Path(s.path).name}"


def _write_package(backend: str, out: Path, task, chosen: list[Pick], categories: list[Category],
                   names: dict[int, str], branch: BranchParams, ref: dict[str, Any], paths: Paths,
                   session: dict[str, Any]) -> str:
    """An import package for an annotation server elsewhere: the images, the tasks and what to do."""
    from visionflow.formats import copy_image

    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: give --out a new folder (a package is never written over)")
    tmp = Path(tempfile.mkdtemp(prefix=".annotate-", dir=_mkdir(out.parent)))
    try:
        for n, p in enumerate(chosen, 1):
            rel = f"{PACKAGE_IMAGES}/{_package_name(n, p.sample)}"
            copy_image(p.sample, tmp / rel, paths.root)
            session["samples"].append({"id": p.sample.id, "image": rel, "rank": p.row.get("rank")})
        if backend == "labelstudio-files":
            tasks = [ls_task(task, p, names, branch.review, local_file_url(s["image"]), _model_label(ref))
                     for p, s in zip(chosen, session["samples"])]
            write_json(tmp / "tasks.json", tasks)
            write_text(tmp / "label_config.xml", project_config(task, categories))
            steps = ("1. Start Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and\n"
                     "   LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<this folder>.\n"
                     "2. Create a project; Settings > Labeling Interface > Code: paste label_config.xml.\n"
                     "3. Settings > Cloud Storage > Add Source Storage > Local files: path <this folder>/images\n"
                     "   (do not sync it), then Settings > Annotation: use predictions to prelabel tasks,\n"
                     f"   model version '{CURRENT_LABELS}'.\n"
                     "4. Import tasks.json. Correct each task and Submit (Skip leaves it as it is).\n"
                     "5. Export as JSON and run: visionflow annotate --task {task} --pull EXPORT.json\n")
        else:
            from visionflow.formats.cvat import write_cvat

            views = [dataclasses.replace(task.label_view(p.sample), path=_package_name(n, p.sample))
                     for n, p in enumerate(chosen, 1)]
            write_cvat(views, categories, tmp, paths.root, copy_images=False, report=ConversionReport())
            _write_review_csv(tmp / "review.csv", task, chosen, names, branch)
            steps = ("1. In CVAT: create a task with the labels of annotations.xml and the files of images/.\n"
                     "2. Actions > Upload annotations > CVAT 1.1: annotations.xml (our current labels).\n"
                     "3. Correct what is wrong (review.csv: why each image is here and what the model says).\n"
                     "4. Export the task as 'CVAT for images 1.1' and run:\n"
                     "   visionflow annotate --task {task} --pull annotations.xml (or the export's .zip)\n")
        write_text(tmp / "README.txt",
                   f"visionflow relabelling package: {len(chosen)} {paths.task} samples, most likely label mistakes "
                   f"first ({ref['report']}).\n\n" + steps.replace("{task}", paths.task))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return str(out)


def _write_review_csv(path: Path, task, chosen: list[Pick], names: dict[int, str], branch: BranchParams) -> None:
    import csv

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "rank", "score", "reason", "model_says"])
    for n, p in enumerate(chosen, 1):
        said = ""
        if p.record is not None:
            view = task.prediction_view(p.sample, p.record, branch.review)
            said = "; ".join([names[c] for c in view.labels] + [f"{names[i.category_id]} {[round(v) for v in i.bbox]}"
                                                               for i in view.instances])
        w.writerow([_package_name(n, p.sample), p.row.get("rank"), p.row.get("score"), p.row.get("reason"), said])
    write_text(path, buf.getvalue())


# --- pull ------------------------------------------------------------------------------------------

def pull(paths: Paths, params: Params, file: Optional[Path] = None) -> dict[str, Any]:
    from visionflow.tasks import get_task

    if not paths.annotate_session.exists():
        raise UserError(f"{paths.annotate_session} not found: nothing was sent for {paths.task}; run "
                        f"`visionflow annotate --task {paths.task} --top N --backend ...` first")
    session = read_json(paths.annotate_session)
    task = get_task(paths.task)
    backend = session["backend"]
    if backend != "labelstudio" and file is None:
        raise UserError(f"the last annotate of {paths.task} wrote a {backend} package ({session.get('out')}): "
                        "give the tool's export with --pull FILE")
    sent = {s["image"]: s["id"] for s in session["samples"]}
    if backend == "cvat-files":
        reviewed, counts = _read_cvat_answers(Path(file), Path(session["out"]), sent)
    else:
        if file is not None:
            tasks, where, root = load_tasks(Path(file)), Path(file), Path(session.get("out") or paths.root)
        else:
            from visionflow.integrations.labelstudio import LabelStudio

            client = LabelStudio(session["url"], os.environ.get("LABEL_STUDIO_API_KEY", ""))
            tasks = client.export_tasks(session["project"])
            where, root = Path(f"{session['url']}/projects/{session['project']}"), Path(session["document_root"])
        reviewed, counts = _read_ls_answers(tasks, where, root, sent)
    manifest = {s.id: s for s in read_manifest(paths.manifest)}
    categories = read_categories(paths.categories)
    by_name, names = {c.name: c for c in categories}, {c.id: c.name for c in categories}
    changes: dict[str, tuple[Sample, Sample]] = {}  # id -> (manifest sample, its corrected label view)
    for sid, (answer, answer_names) in reviewed.items():
        if sid not in manifest:
            raise UserError(f"{sid} was sent for review but is no longer in the manifest; re-run the review and "
                            "annotate again")
        view = _in_ids(answer, answer_names, by_name, sid)
        s = manifest[sid]
        if _key(task.apply_correction(s, view), names) != _key(s, names):
            changes[sid] = (s, view)
    summary = {"task": paths.task, "backend": backend, "sent": len(sent), "reviewed": len(reviewed), **counts,
               "corrected": len(changes), "versions": []}
    if not changes:
        log.info("annotate --pull: %d of %d sent samples reviewed, none changed: no new version", len(reviewed),
                 len(sent))
        return summary
    record = {"review": session["review"], "backend": backend, "sent": len(sent), "reviewed": len(reviewed),
              "pulled": _now(), **({"project": f"{session['url']}/projects/{session['project']}"}
                                   if backend == "labelstudio" else {"file": str(file)})}
    for source in sorted({sid.split("/", 1)[0] for sid in changes}):
        src = next((s for s in params.ingest.sources if s.name == source), None)
        if src is None:
            raise UserError(f"source {source!r} of the corrected samples is not in {paths.params}'s ingest.sources")
        mine = {sid: v for sid, v in changes.items() if sid.split("/", 1)[0] == source}
        summary["versions"].append(write_version(paths, src, task, mine, categories, record))
    set_sources(paths, summary["versions"])
    return summary


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _read_ls_answers(tasks: list[dict[str, Any]], where: Path, images_root: Path,
                     sent: dict[str, str]) -> tuple[dict[str, tuple[Sample, dict[int, str]]], dict[str, int]]:
    """{sample id: (the submitted label view, its category names)} for tasks a person submitted.

    A task without an annotation, or with only skipped (cancelled) ones, was not reviewed and gives
    nothing; of several annotations the last updated is the answer."""
    by_image = {v: k for k, v in sent.items()}  # sample id -> the image path it was sent with
    answered, skipped = [], 0
    for t in tasks:
        anns = [a for a in (t.get("annotations") or []) if isinstance(a, dict) and not a.get("was_cancelled")]
        if not anns:
            skipped += bool(t.get("annotations"))
            continue
        latest = max(anns, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
        data = dict(t.get("data") or {})
        if data.get("visionflow_id") in by_image:  # the image as sent, whatever the server made of its URL
            data["image"] = local_file_url(by_image[data["visionflow_id"]])
        answered.append({"id": t["id"], "data": data, "annotations": [latest]})
    counts = {"not_reviewed": len(tasks) - len(answered) - skipped, "skipped": skipped}
    if not answered:
        return {}, counts
    with tempfile.TemporaryDirectory(prefix="visionflow-pull-") as tmp:
        answers = Path(tmp) / "answers.json"
        answers.write_text(json.dumps(answered), encoding="utf-8")
        try:
            result = read_labelstudio(images_root, answers, "relabel")
        except DataError as exc:
            raise UserError(f"{where}: {str(exc).replace(str(answers), 'the submitted annotations')}") from None
    names = {c.id: c.name for c in result.categories}
    out = {}
    for s in result.samples:
        if s.path not in sent:
            raise UserError(f"{where}: a submitted task shows {s.path}, which the last annotate did not send; pull "
                            "the export of the project (or package) it created")
        out[sent[s.path]] = (s, names)
    return out, counts


def _read_cvat_answers(file: Path, package: Path, sent: dict[str, str]) -> tuple[dict, dict[str, int]]:
    from visionflow.formats.cvat import read_cvat

    result = read_cvat(package / PACKAGE_IMAGES, file, "relabel")
    names = {c.id: c.name for c in result.categories}
    out = {}
    for s in result.samples:
        sid = sent.get(f"{PACKAGE_IMAGES}/{s.path}")
        if sid is None:
            raise DataError(file, f"image {s.path!r} was not in the package the last annotate wrote ({package})",
                            hint="pull the export of the task created from that package")
        out[sid] = (s, names)
    return out, {"not_reviewed": len(sent) - len(out), "skipped": 0}


def _in_ids(answer: Sample, answer_names: dict[int, str], by_name: dict[str, Category], sid: str) -> Sample:
    """A label view read from the tool (its own category ids) in the manifest's ids."""
    def cid(i: int) -> int:
        name = answer_names[i]
        if name not in by_name:
            raise UserError(f"{sid}: the correction uses the label {name!r}, which is not a category of the project "
                            f"({', '.join(sorted(by_name))}); use one of those, or add it to the source first")
        return by_name[name].id

    return dataclasses.replace(answer, labels=[cid(c) for c in answer.labels],
                               instances=[dataclasses.replace(i, category_id=cid(i.category_id), attributes={})
                                          for i in answer.instances])


# --- the new version -------------------------------------------------------------------------------

def write_version(paths: Paths, src: SourceParams, task, changes: dict[str, tuple[Sample, Sample]],
                  categories: list[Category], record: dict[str, Any]) -> dict[str, Any]:
    """The whole source, corrected, as data/corrections/<source>/v<N>/ in the source's own format."""
    from visionflow.stages.ingest import read_options, resolve_source

    where = resolve_source(src, paths)
    options = read_options(src, where)  # read (and read back) as ingest reads it, before its category map
    raw = read_source(where.format, where.images, where.annotations, src.name, root=where.root, **options)
    raw_cats = list(raw.categories)
    to_raw: dict[int, int] = {}
    for c in categories:
        if src.name in c.source_ids:
            to_raw[c.id] = c.source_ids[src.name]
    by_id = {s.id: s for s in raw.samples}
    corrected: dict[str, Sample] = {}
    for sid, (before, view) in changes.items():
        if sid not in by_id:
            raise UserError(f"{sid} is not in source {src.name!r} as it is now ({where.annotations}); re-run ingest, "
                            "the review and annotate")
        for cid in {*view.labels, *(i.category_id for i in view.instances)} - set(to_raw):
            new_id = max([c.id for c in raw_cats], default=0) + 1  # a category this source did not have
            name = next(c.name for c in categories if c.id == cid)
            raw_cats.append(Category(id=new_id, name=name, source_ids={src.name: new_id}))
            to_raw[cid] = new_id
        raw_view = dataclasses.replace(view, labels=[to_raw[c] for c in view.labels],
                                       instances=[dataclasses.replace(i, category_id=to_raw[i.category_id])
                                                  for i in view.instances])
        corrected[sid] = task.apply_correction(by_id[sid], raw_view)
    samples = [corrected.get(s.id, s) for s in raw.samples]

    base = _mkdir(paths.corrections_dir(src.name))
    version = 1 + max([int(p.name[1:]) for p in base.glob("v*") if p.name[1:].isdigit()], default=0)
    final = base / f"v{version}"
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=base))
    try:
        annotations, images, root = _write_and_check(where.format, samples, raw_cats, tmp, final, where, src, paths,
                                                     options)
        names = {c.id: c.name for c in categories}
        write_json(tmp / "corrections.json", {
            **record, "source": src.name, "version": version, "format": where.format, "task": paths.task,
            "corrected": len(changes),
            "previous": {"images": paths.rel_or_abs(where.images), "annotations": paths.rel_or_abs(where.annotations)},
            "samples": [{"id": sid, "before": _describe(task.label_view(before), names),
                         "after": _describe(view, names)} for sid, (before, view) in sorted(changes.items())]})
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    rel = paths.rel_or_abs
    return {"source": src.name, "version": version, "format": where.format, "corrected": len(changes),
            "images": rel(images if images != tmp else final),
            "annotations": rel(final / annotations.relative_to(tmp)), "corrections": rel(final / "corrections.json")}


def _write_and_check(fmt: str, samples: list[Sample], categories: list[Category], tmp: Path, final: Path, where,
                     src: SourceParams, paths: Paths, options: dict[str, Any]) -> tuple[Path, Path, str]:
    """Write the version into `tmp` and read it back: annotations beside the original images where
    the format allows it, else a self-contained copy with the images. Every
    sample must read back as intended, or nothing is kept."""
    attempts = [(False, where.images, where.root), (True, tmp, paths.rel_or_abs(final))]
    problems = []
    for copy, images, root in attempts:
        for p in list(tmp.iterdir()):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        report = ConversionReport()
        try:
            annotations = write_format(fmt, samples, categories, tmp, paths.root, copy_images=copy, report=report)
            back = read_source(fmt, images, annotations, src.name, root=root, **options)
        except (DataError, ValueError) as exc:  # e.g. a format that cannot be written apart from its images
            problems.append(f"{'copied' if copy else 'beside the images'}: {exc}")
            continue
        diff = _difference(samples, back.samples, categories, back.categories)
        if diff is None:
            return annotations, images, root
        problems.append(f"{'copied' if copy else 'beside the images'}: {diff}")
    hint = ""
    if fmt == "imagefolder":  # the class is the folder: a corrected class would move the file (a new sample id)
        hint = (". ImageFolder keeps each image's class in its folder name, so a corrected class cannot be written "
                "without moving the image; export the source as CSV (`visionflow export-annotations --format csv "
                "--out DIR`), point the ingest source at that file, and pull again")
    raise UserError(f"the corrected {src.name!r} written as {fmt} does not read back as intended, so nothing was "
                    f"changed: {'; '.join(problems)}{hint}")


def _key(s: Sample, names: dict[int, str]) -> tuple:
    inst = sorted((names[i.category_id], tuple(round(v, 2) for v in i.bbox), bool(i.iscrowd),
                   tuple(tuple(round(v, 2) for v in r) for r in i.polygons), json.dumps(i.rle, sort_keys=True))
                  for i in s.instances)
    return (s.width, s.height, s.sha256, tuple(sorted(names[c] for c in s.labels)), tuple(inst))


def _difference(want: list[Sample], got: list[Sample], want_cats: list[Category],
                got_cats: list[Category]) -> Optional[str]:
    wn, gn = {c.id: c.name for c in want_cats}, {c.id: c.name for c in got_cats}
    got_by = {s.id: s for s in got}
    if set(got_by) != {s.id for s in want}:
        missing = sorted({s.id for s in want} - set(got_by))[:3]
        return f"{len(got)} samples read back for {len(want)} written (e.g. missing {missing})"
    for s in want:
        if _key(s, wn) != _key(got_by[s.id], gn):
            return f"sample {s.id} reads back differently"
    return None


def _describe(view: Sample, names: dict[int, str]) -> list[str]:
    return [names[c] for c in view.labels] + [f"{names[i.category_id]} {[round(v, 1) for v in i.bbox]}"
                                              for i in view.instances]


def set_sources(paths: Paths, versions: list[dict[str, Any]]) -> None:
    """Point params.yaml's sources at their new versions (comments and layout kept), check that the
    result loads, then regenerate dvc.yaml where the project has one."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    before = paths.params.read_text(encoding="utf-8")
    doc = yaml.load(before)
    for v in versions:
        entry = next(s for s in doc["ingest"]["sources"] if s["name"] == v["source"])
        entry.pop("path", None)
        entry["format"], entry["images"], entry["annotations"] = v["format"], v["images"], v["annotations"]
        entry["corrections"] = v["corrections"]
    buf = io.StringIO()
    yaml.dump(doc, buf)
    write_text(paths.params, buf.getvalue())
    try:
        params = load_params(paths.params)
    except Exception:
        write_text(paths.params, before)
        raise
    if (paths.root / "dvc.yaml").exists():
        from visionflow.integrations.dvc import write_generated

        write_generated(params, paths)
