"""What the training benchmarks share: a small classify-only project with synth, ingest and split
done, and the per-epoch figure they report."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def classify_project(root: Path, n: int, size: int, epochs: int, batch: int, model: dict[str, Any],
                     **train: Any) -> Path:
    """The repo's params.yaml with the classify branch only, smaller (`n` synthetic images at
    `size` px; `model` and `train` override its train section), with synth, ingest and split run."""
    from visionflow.core.config import load_params
    from visionflow.core.paths import Paths
    from visionflow.stages import get_stage

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for task in ("detect", "segment", "multilabel"):
        params.pop(task, None)
    params["synth"] = {"n": n, "size": size, "seed": 0}
    section = params["classify"]["train"]
    section.update(epochs=epochs, batch_size=batch, image_size=size, warmup_epochs=0, early_stopping=None, **train)
    section["model"] = {**section["model"], **model}
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    loaded, paths = load_params(root / "params.yaml"), Paths(root)
    for name in ("synth", "ingest", "split"):
        get_stage(name, loaded).run(loaded, paths)
    return root / "params.yaml"


def epoch_seconds(seconds: list[float]) -> float:
    """The median epoch, the first (start-up) left out when there are others."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)
