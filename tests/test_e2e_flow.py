"""End to end: the Prefect flow on a tiny config, on Prefect's real (temporary) server, with
MLflow on a temporary sqlite store and FiftyOne's real database."""
import asyncio
import json
import sys

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from project import TASKS, make_project  # noqa: E402

from visionflow.core.paths import Paths  # noqa: E402
from visionflow.evaluation.report import read_evaluation  # noqa: E402
from visionflow.stages import pipeline_stages  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from visionflow.integrations.prefect import run_pipeline

    root = tmp_path_factory.mktemp("flowproj")
    params_file = make_project(root, name="e2eflow", tasks=TASKS)
    with prefect_test_harness(server_startup_timeout=120):
        results = run_pipeline(params_file)
        task_names = asyncio.run(_task_run_names())
    return root, results, task_names


async def _task_run_names():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    async with get_client() as client:
        runs = await client.read_task_runs(sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    return [r.name.rsplit("-", 1)[0] for r in sorted(runs, key=lambda r: r.start_time)], \
        {r.state_name for r in runs}


def test_flow_ran_every_stage_in_dag_order(flow_run):
    _, results, (names, states) = flow_run
    from visionflow.core.config import load_params

    root = flow_run[0]
    expected = tuple(s.name for s in pipeline_stages(load_params(root / "params.yaml")))
    assert tuple(results) == expected
    assert tuple(names) == expected
    assert states == {"Completed"}


def test_model_registered_with_alias_and_run_contents(flow_run):
    from mlflow import MlflowClient

    root, results, _ = flow_run
    reg = results["register-classify"]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version_by_alias("e2eflow-classifier", "candidate")
    assert int(version.version) == int(reg["version"]) == 1
    run = client.get_run(version.run_id)
    ev = json.loads(Paths(root).eval_metrics.read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(ev["accuracy"])
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 1  # 1 epoch
    assert run.data.tags["manifest_md5"]
    assert "git_commit" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"figures", "augmentation", "data", "metrics"} <= {a.split("/")[0] for a in artifacts}
    data = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert data == {"data/validation.json", "data/split.json"}
    assert json.loads(Paths(root).registration.read_text())["version"] == reg["version"]


def test_fiftyone_dataset_has_test_split_with_predictions(flow_run):
    import fiftyone as fo

    root, results, _ = flow_run
    split = json.loads(Paths(root).split_file.read_text())["splits"]
    ds = fo.load_dataset("e2eflow-test")
    assert ds.persistent and len(ds) == len(split["test"]) == results["inspect-classify"]["samples"]
    preds = [json.loads(l) for l in Paths(root).predictions.read_text().splitlines()]
    assert sorted(ds.values("predictions.label")) == sorted(p["name"] for p in preds)
    assert all(0 < c <= 1 for c in ds.values("predictions.confidence"))


def test_detect_branch_writes_coco_files_equal_to_its_metrics_and_fiftyone_eval(flow_run):
    import fiftyone as fo

    from visionflow.evaluation.coco import evaluate_coco

    root, results, _ = flow_run
    paths = Paths(root, "detect")
    metrics = read_evaluation(paths)  # evaluate.json and its details (the evaluator's settings)
    # The COCO files next to the metrics reproduce them with any COCO tool (here: ours).
    again = evaluate_coco(paths.coco_gt, paths.coco_results, "bbox")
    assert again["AP50"] == metrics["AP50"] and again["AP"] == metrics["AP"]
    assert metrics["evaluator"]["max_dets"] == [1, 10, 100] and metrics["evaluator"]["iou_type"] == "bbox"
    assert set(metrics["evaluator"]["area_ranges"]) == {"all", "small", "medium", "large"}
    assert {p.name for p in paths.figures_dir.iterdir()} >= {"pr_curves.png", "confusion_matrix.png",
                                                            "test_predictions.png", "per_class.png"}
    ds = fo.load_dataset("e2eflow-detect-test")
    assert "eval" in ds.list_evaluations()
    assert ds.get_evaluation_info("eval").config.method == "coco"
    n_gt = sum(len(s.instances) for s in _test_samples(root))
    assert sum(ds.values("eval_tp")) + sum(ds.values("eval_fn")) == n_gt - _crowds(root)
    reg = results["register-detect"]
    assert reg["model_name"] == "e2eflow-detect" and reg["alias"] == "candidate"


def test_segment_branch_metrics_masks_and_fiftyone_eval(flow_run):
    import fiftyone as fo

    root, results, _ = flow_run
    paths = Paths(root, "segment")
    metrics = read_evaluation(paths)
    assert 0 <= metrics["miou"] <= 1 and metrics["classes"][0] == "background"
    assert len(list(paths.pred_masks_dir.glob("*.png"))) == metrics["n"]
    ds = fo.load_dataset("e2eflow-segment-test")
    assert "eval" in ds.list_evaluations() and len(ds) == metrics["n"]
    assert ds.default_mask_targets[0] == "background"
    # masks drawn when the App opens, and the class activation maps where a test image has one
    assert sorted(ds.app_config.active_fields.paths) == ["cam", "ground_truth", "predictions"]
    assert len(ds.load_saved_view("explained")) == len(ds.exists("cam")) > 0
    scheme = ds.app_config.color_scheme  # one colour per class, not one per field
    colours = {c["intTarget"]: c["color"] for c in scheme.default_mask_targets_colors}
    assert scheme.color_by == "value" and sorted(colours) == sorted(k for k in ds.default_mask_targets if k)
    assert len(set(colours.values())) == len(colours)
    assert results["register-segment"]["model_name"] == "e2eflow-segment"


def test_promote_step_ran_for_every_branch(flow_run, capsys):
    from visionflow.integrations.prefect import print_report

    root, results, _ = flow_run
    for task in TASKS:
        decision = results[f"promote-{task}"]
        assert decision["decision"] in ("promoted", "refused")
        assert json.loads(Paths(root, task).promotion.read_text())["decision"] == decision["decision"]
        assert decision["aliases"] == ["candidate", "champion"] if decision["promoted"] else ["candidate"]
    # the end-of-run summary says what the gate did, not only the alias register gave
    print_report(results, root / "params.yaml")
    summary = capsys.readouterr().out
    for task in TASKS:
        gate = results[f"promote-{task}"]
        expected = "@candidate @champion (promoted by the gate)" if gate["promoted"] else "@candidate (gate: refused"
        assert f"version {results[f'register-{task}']['version']} aliases {expected}" in summary, summary


def _test_samples(root):
    from visionflow.manifest import read_manifest, samples_in_split

    paths = Paths(root)
    return samples_in_split(read_manifest(paths.manifest), paths.split_file, "test")


def _crowds(root) -> int:
    return sum(1 for s in _test_samples(root) for i in s.instances if i.iscrowd)


def test_evaluate_gate_and_export_parity_report_the_same_test_metric(flow_run):
    """One scoring path (Task.test_metric) serves the evaluate stage, the promotion gate and the
    export parity check: on each branch's trained model the three numbers agree."""
    root, _, _ = flow_run
    for task in TASKS:
        paths = Paths(root, task)
        ev = json.loads(paths.eval_metrics.read_text())
        gate = json.loads(paths.promotion.read_text())
        name = ev["primary_metric"]
        assert gate["primary"]["metric"] == name, task
        # same samples and code; only the batch sizes differ (float noise of batched convolutions)
        assert gate["primary"]["candidate"] == pytest.approx(ev[name], abs=1e-6), task
        export = gate["export"]
        assert export["status"] == "checked" and export["metric"] == name, (task, export)
        assert export["metric_torch"] == pytest.approx(ev[name], abs=1e-6), task


def test_multilabel_branch_end_to_end(flow_run):
    """The fourth task, added as one module: metrics, FiftyOne Classifications with per-image
    TP/FP/FN, and the registered pyfunc answering the task's columns."""
    import fiftyone as fo
    import mlflow
    import pandas as pd

    from visionflow.deploy.pyfunc import encode_image
    from visionflow.manifest.images import load_rgb
    from visionflow.tasks.multilabel import image_classes

    root, results, _ = flow_run
    paths = Paths(root, "multilabel")
    metrics = read_evaluation(paths)
    assert metrics["primary_metric"] == "map" and 0 <= metrics["map"] <= 1
    assert set(metrics["per_class"]) == set(metrics["thresholds"]) and 0 <= metrics["micro_f1"] <= 1
    test = _test_samples(root)
    truth = [image_classes(s) for s in test]
    assert any(len(t) > 1 for t in truth)  # several classes per image: real multi-label data
    ds = fo.load_dataset("e2eflow-multilabel-test")
    assert len(ds) == len(test) and ds.get_field("ground_truth").document_type is fo.Classifications
    assert sum(ds.values("eval_tp")) + sum(ds.values("eval_fn")) == sum(len(t) for t in truth)
    reg = results["register-multilabel"]
    model = mlflow.pyfunc.load_model(f"models:/{reg['model_name']}/{reg['version']}")
    frame = model.predict(pd.DataFrame({"image": [encode_image(load_rgb(test[0].image_path(root)))]}))
    assert list(frame.columns) == ["labels", "names", "scores"]
    preds = [json.loads(line) for line in paths.predictions.read_text().splitlines()]
    assert json.loads(frame.loc[0, "labels"]) == preds[0]["labels"]  # the registry answers as evaluate saw it
