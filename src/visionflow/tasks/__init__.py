"""The task registry: each task is one module behind the contract of visionflow.tasks.base,
found by name. Light on purpose (no torch): stages name tasks here, and dvc.yaml's code deps
follow the task's own module (visionflow.integrations.codedeps).
"""
from __future__ import annotations

from typing import Any


_TASKS = {
    "classify": "visionflow.tasks.classify:ClassifyTask",
    "detect": "visionflow.tasks.detect:DetectTask",
    "segment": "visionflow.tasks.segment:SegmentTask",
    "multilabel": "visionflow.tasks.multilabel:MultilabelTask",
}


def task_of(meta: dict[str, Any]) -> str:
    """The task of a model folder's meta.json; models written before task branches existed were
    classifiers and carry no task."""
    return str(meta.get("task") or "classify")


def task_module(name: str) -> str:
    """The module that implements task `name` (what its branch stages' code depends on)."""
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; tasks are {', '.join(_TASKS)}")
    return _TASKS[name].partition(":")[0]


def get_task(name: str, params=None):
    """The task `name`; `params` (its TrainParams) configures its loss where it has settings."""
    import importlib

    module = task_module(name)
    return getattr(importlib.import_module(module), _TASKS[name].partition(":")[2])(params)
