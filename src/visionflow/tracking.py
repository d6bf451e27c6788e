"""Compatibility for registered models: a version logged before the package was regrouped
pickled its pyfunc class as `visionflow.tracking.VisionflowPyfunc`; MLflow unpickles it by that
name. The MLflow integration lives in visionflow.integrations.mlflow."""
from visionflow.integrations.mlflow import VisionflowPyfunc  # noqa: F401
