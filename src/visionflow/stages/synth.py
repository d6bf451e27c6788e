"""Stage `synth`: render the built-in shapes dataset into data/shapes (COCO annotations)."""
from __future__ import annotations

from visionflow.core.config import SynthParams
from visionflow.datasets.synth import render_dataset
from visionflow.core.paths import Paths


def synth(params: SynthParams, paths: Paths) -> dict[str, int]:
    return render_dataset(paths.synth_dir, n=params.n, size=params.size, seed=params.seed)
