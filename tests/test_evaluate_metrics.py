"""The evaluate stage of every task writes a flat metrics file (scalars only: one narrow column
each in `dvc metrics show`, which drew a 3,509-character header from the per-class tables) and
keeps the tables in reports/<task>/evaluate_details.json, where MLflow logging still finds them."""
import json
import sys
from pathlib import Path

import albumentations as A
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

from visionflow.core.config import AugmentParams, ModelParams, TrainParams, load_params  # noqa: E402
from visionflow.core.files import write_json  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.evaluation.report import read_evaluation  # noqa: E402
from visionflow.manifest import read_categories  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402
from visionflow.tasks import get_task  # noqa: E402

TASKS = ("classify", "detect", "segment", "multilabel")
MODELS = {
    "classify": {"arch": "resnet18"},
    "multilabel": {"arch": "resnet18"},
    "segment": {"arch": "unet", "backbone": None, "backbone_weights": None, "width": 0.25},
    "detect": {"arch": "fasterrcnn", "backbone": "mobilenet_v2", "backbone_weights": None, "width": 0.25,
               "score_threshold": 0.0},  # random weights score low: keep detections to score
}
# a per-class number the MLflow run logs, read back from the details
PER_CLASS_METRIC = {"classify": "test_f1_circle", "detect": "test_AP_circle", "segment": "test_iou_circle",
                    "multilabel": "test_ap_circle"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A project with all four branches, each with a random-init model folder, evaluated."""
    root = tmp_path_factory.mktemp("flat-metrics")
    params_file = make_project(root, {"synth": {"n": 16}}, name="flat", tasks=TASKS)
    params, paths = load_params(params_file), Paths(root)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)
    classes = [c.name for c in read_categories(paths.categories)]
    for task in TASKS:
        _model_dir(paths.for_task(task).model_dir, task, classes)
        get_stage(f"evaluate-{task}", params).run(params, paths)
    return paths


def _model_dir(root: Path, task: str, classes: list[str]) -> None:
    """A model folder as the train stage writes it, with random weights."""
    params = TrainParams(model=ModelParams(**MODELS[task]), image_size=64, augment=AugmentParams(preset="none"))
    t = get_task(task)
    torch.manual_seed(0)
    root.mkdir(parents=True)
    torch.save(t.build_model(params, len(classes), pretrained=False).state_dict(), root / "model.pt")
    write_json(root / "meta.json", {"task": task, "arch": MODELS[task]["arch"], "num_classes": len(classes),
                                    "classes": classes, "image_size": 64, "mean": [0.485, 0.456, 0.406],
                                    "std": [0.229, 0.224, 0.225], "params": params.model_dump(mode="json")})
    write_json(root / "augment.json", A.to_dict(t.build_transforms(params)[0]))


@pytest.mark.parametrize("task", TASKS)
def test_metrics_file_is_flat_and_the_tables_are_beside_it(evaluated, task):
    paths = evaluated.for_task(task)
    metrics = json.loads(paths.eval_metrics.read_text())
    assert all(v is None or isinstance(v, (int, float, str)) for v in metrics.values()), metrics
    assert len(metrics) < 40 and len(json.dumps(metrics)) < 1500, metrics
    assert metrics["task"] == task and metrics["primary_metric"] in metrics
    details = json.loads(paths.eval_details.read_text())
    assert details["task"] == task and not set(details) - {"task"} & set(metrics)
    tables = details.get("per_class") or details.get("per_class_AP")
    assert set(tables) >= {"circle", "square"}  # the per-class tables moved here, whole
    # MLflow logging reads both: the per-class test metrics are still there
    values = get_task(task).tracking_metrics(read_evaluation(paths))
    assert PER_CLASS_METRIC[task] in values


def test_dvc_tracks_the_details_as_a_committed_output_that_register_depends_on(evaluated):
    import yaml

    from visionflow.integrations.dvc import render

    params = load_params(evaluated.root / "params.yaml")
    stages = yaml.safe_load(render(params, evaluated))["stages"]
    for task in TASKS:
        details = evaluated.rel(evaluated.for_task(task).eval_details)
        assert {details: {"cache": False}} in stages[f"evaluate-{task}"]["outs"]
        assert details in stages[f"register-{task}"]["deps"]
        assert [next(iter(m)) for m in stages[f"evaluate-{task}"]["metrics"]] == [
            evaluated.rel(evaluated.for_task(task).eval_metrics)]
