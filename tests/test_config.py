from pathlib import Path
from typing import Optional

import pytest
import yaml

from visionflow.core.config import (TASK_OPTIONS, TASKS, BranchParams, ConfigError, Params, TrainParams, has_key,
                                    leaf_keys, load_params, tasks_with, tasks_with_resize)
from visionflow.core.paths import Paths

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_project_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.ingest.sources[0].format == "coco"
    assert abs(params.split.train + params.split.val + params.split.test - 1) < 1e-9


def test_unknown_key_is_rejected_with_its_location(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["detect"]["train"]["epochz"] = 3
    with pytest.raises(ConfigError) as err:
        load_params(_write(tmp_path, data))
    assert "detect.train.epochz: unknown key" in str(err.value)
    assert str(tmp_path / "params.yaml") in str(err.value)


def test_bad_values_are_rejected(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["split"]["train"] = 0.9  # ratios no longer sum to 1
    with pytest.raises(ConfigError, match="must be 1.0"):
        load_params(_write(tmp_path, data))
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["classify"]["train"]["model"]["arch"] = "resnet1000"
    with pytest.raises(ConfigError, match="classify.train.model.arch"):
        load_params(_write(tmp_path, data))
    # an architecture of another task is named as such
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["segment"]["train"]["model"]["arch"] = "fasterrcnn"
    with pytest.raises(ConfigError, match=r"segment.train.model.arch: 'fasterrcnn' is not a segment architecture"):
        load_params(_write(tmp_path, data))
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["detect"]["train"]["dice_weight"] = 1.0
    with pytest.raises(ConfigError, match=r"detect.train.dice_weight: the Dice loss is for segment only"):
        load_params(_write(tmp_path, data))
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["multilabel"]["train"]["label_smoothing"] = 0.1
    with pytest.raises(ConfigError, match=r"multilabel.train.label_smoothing: label smoothing is for classify"):
        load_params(_write(tmp_path, data))


# Each TaskOptions flag, and the train settings that ask for it (with what else they need, so
# that only the branch's check can refuse them).
OPTION_SETTINGS = {
    "feature_cache": {"feature_cache": True, "model": {"mode": "feature_extract"},
                      "augment": {"preset": "none", "transforms": None}},
    "reduced_decode": {"decode": "reduced"},
    "dice": {"dice_weight": 0.5},
    "label_smoothing": {"label_smoothing": 0.1},
}


def _deep_update(d: dict, over: dict) -> dict:
    for k, v in over.items():
        d[k] = _deep_update(d.get(k) or {}, v) if isinstance(v, dict) else v
    return d


@pytest.mark.parametrize("task", TASKS)
def test_a_branch_takes_what_its_task_options_allow_and_refuses_the_rest(tmp_path, task):
    """config.TASK_OPTIONS is the one place that says what a task's params may set: every flag it
    allows loads, every flag it does not is refused naming the branch, the key and the tasks that
    take it; and train.resize likewise."""
    options = TASK_OPTIONS[task]
    for option, settings in OPTION_SETTINGS.items():
        data = yaml.safe_load((REPO / "params.yaml").read_text())
        _deep_update(data[task]["train"], settings)
        key = next(iter(settings))
        if getattr(options, option):
            assert getattr(load_params(_write(tmp_path, data)).branch(task).train, key) == settings[key]
        else:
            with pytest.raises(ConfigError, match=rf"{task}\.train\.{key}: .* is for {tasks_with(option)}\b"):
                load_params(_write(tmp_path, data))
    for mode in ("letterbox", "stretch", "fit"):
        data = yaml.safe_load((REPO / "params.yaml").read_text())
        data[task]["train"]["resize"] = mode
        if mode == "fit" and mode not in options.resize:
            with pytest.raises(ConfigError, match=rf"{task}\.train\.resize: fit .* is for {tasks_with_resize('fit')} only"):
                load_params(_write(tmp_path, data))
        else:  # a task that always stretches does not read letterbox or stretch, and refuses neither
            assert load_params(_write(tmp_path, data)).branch(task).train.resize == mode


def test_the_task_registry_params_and_task_options_name_the_same_tasks():
    """A task is an entry in TASK_OPTIONS, a branch field of Params and a module in
    visionflow.tasks; its class reads its own entry (reduces_decode, input_resize)."""
    from visionflow.tasks import _TASKS, get_task

    branches = tuple(f for f, field in Params.model_fields.items() if field.annotation == Optional[BranchParams])
    assert TASKS == tuple(_TASKS) == branches  # no branch field without options, no options without a field
    for task in TASKS:
        implementation = get_task(task)
        assert implementation.name == task
        assert implementation.reduces_decode == TASK_OPTIONS[task].reduced_decode
        assert implementation.decode_for("reduced") == ("reduced" if TASK_OPTIONS[task].reduced_decode else "full")
        for mode in ("letterbox", "stretch", "fit"):  # what a model folder trained with `mode` is fed
            expected = mode if mode in TASK_OPTIONS[task].resize else "stretch"
            assert implementation.input_resize({"params": {"resize": mode}}) == expected, (task, mode)
        assert implementation.input_resize({"params": {}}) == "stretch"  # trained before train.resize existed


def test_a_refusal_reads_as_our_words_under_the_key_it_is_about(tmp_path):
    """A check on the whole file (a branch's options) names its keys itself: no empty location,
    and no pydantic "Value error, " before the words; a section's check keeps its section."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["detect"]["train"]["label_smoothing"] = 0.1
    data["classify"]["train"]["feature_cache"] = True  # TrainParams' own check: needs feature_extract
    with pytest.raises(ConfigError) as info:
        load_params(_write(tmp_path, data))
    lines = str(info.value).splitlines()
    assert lines[0].endswith("params.yaml: invalid parameters:")
    assert lines[1] == ("  classify.train: train.feature_cache: true needs train.model.mode: feature_extract "
                        "(got full: the backbone trains, so its features change every step); set feature_cache: false")
    assert "Value error" not in str(info.value) and not any(line.startswith("  : ") for line in lines)
    del data["classify"]["train"]["feature_cache"]
    with pytest.raises(ConfigError) as info:
        load_params(_write(tmp_path, data))
    assert str(info.value).splitlines()[1] == ("  detect.train.label_smoothing: label smoothing is for classify's "
                                                "single-label cross-entropy only; set it to 0")


def test_branches(tmp_path):
    params = load_params(REPO / "params.yaml")
    assert params.tasks == ("classify", "detect", "segment", "multilabel")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    del data["detect"]
    assert load_params(_write(tmp_path, data)).tasks == ("classify", "segment", "multilabel")
    for task in ("classify", "segment", "multilabel"):
        del data[task]
    with pytest.raises(ConfigError, match="at least one task branch"):
        load_params(_write(tmp_path, data))
    # Two branches may not write the same registered model (or FiftyOne dataset).
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["segment"]["register"]["model_name"] = data["detect"]["register"]["model_name"]
    with pytest.raises(ConfigError, match="its own register.model_name"):
        load_params(_write(tmp_path, data))


def test_paths_per_task(tmp_path):
    paths = Paths(tmp_path)
    det = paths.for_task("detect")
    assert det.model_dir == tmp_path / "models/detect" and det.eval_metrics == tmp_path / "metrics/detect/evaluate.json"
    assert det.manifest == paths.manifest  # shared stages' files do not move
    assert det.model_dir != paths.for_task("segment").model_dir


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_sections_are_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(Exception):
        params.detect.train.epochs = 99


def test_leaf_keys_and_has_key():
    keys = leaf_keys(TrainParams)
    assert "model.arch" in keys and "early_stopping.patience" in keys and "augment.transforms" in keys
    for k in leaf_keys(Params):
        assert has_key(Params, k), k
    assert not has_key(Params, "train.model.nope")
    assert not has_key(Params, "nosection")


def test_paths_are_under_root(tmp_path):
    paths = Paths(tmp_path)
    for name in dir(Paths):
        value = getattr(paths, name)
        if isinstance(value, Path):
            assert tmp_path in value.parents or value == tmp_path, name
