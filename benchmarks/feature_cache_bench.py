"""Feature-extract training with cached features against without (issue 12, benchmark 4).

Trains one classifier with `model.mode: feature_extract` and `augment.preset: none` through the
real train stage twice, side by side in one run, on the same synthetic project (synth, ingest
and split once):

  without  `train.feature_cache: false`: every epoch decodes, resizes and normalises each image
           and runs the frozen backbone on it (train and val splits), then the head
  with     `train.feature_cache: true`: the backbone runs once over the train and val images
           before training (the "feature pass"); every epoch trains the head on stored features

Both trainings are in this process, one after the other, `--repeats` times alternating (so
slow phases of a busy machine hit both). Per run: the epoch wall times from the stage's
run.json (the median over the epochs after the first) and the stage's wall time. Printed:
epoch seconds with and without and their ratio (issue 12's goal: >= 5x), the feature pass, and
the whole train stage with and without. The two runs train to the same weights
(tests/test_feature_cache.py); the benchmark checks that the saved heads agree.

    .venv/bin/python benchmarks/feature_cache_bench.py --quick    # under a minute: 120 images at 64 px
    .venv/bin/python benchmarks/feature_cache_bench.py            # 400 images at 112 px, mobilenet_v2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _project import classify_project, epoch_seconds  # benchmarks/_project.py (this folder)

REPO = Path(__file__).resolve().parents[1]


def make_project(root: Path, n: int, size: int, epochs: int, batch: int, arch: str) -> Path:
    """A classify-only project (the repo's params.yaml, smaller) with synth/ingest/split done;
    random weights: the same arithmetic as ImageNet weights, without needing torchvision's cache."""
    augment = yaml.safe_load((REPO / "params.yaml").read_text())["classify"]["train"]["augment"]
    return classify_project(root, n, size, epochs, batch, {"arch": arch, "weights": None, "mode": "feature_extract"},
                            augment={**augment, "preset": "none", "transforms": None}, feature_cache=False)


class _FeaturePass(logging.Handler):
    """Picks the feature pass's seconds out of the feature cache's log line."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"in ([0-9.]+) s; the head trains", record.getMessage())
        if m:
            self.seconds.append(float(m.group(1)))


def train(params_file: Path, cached: bool) -> dict:
    import torch

    from visionflow.core.config import load_params
    from visionflow.core.paths import Paths
    from visionflow.stages import get_stage

    params = load_params(params_file)
    branch = params.classify.model_copy(update={"train": params.classify.train.model_copy(
        update={"feature_cache": cached})})
    params = params.model_copy(update={"classify": branch})
    paths = Paths(params_file.parent)
    shutil.rmtree(paths.checkpoint_dir, ignore_errors=True)
    t0 = time.perf_counter()
    get_stage("train-classify", params).run(params, paths)
    wall = time.perf_counter() - t0
    epochs = [e["seconds"] for e in json.loads(paths.train_run.read_text())["epochs"]]
    state = torch.load(paths.model_dir / "model.pt", weights_only=True)
    return {"epochs": epochs, "wall": wall, "state": state}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="120 images at 64 px, 3 epochs: under a minute")
    ap.add_argument("--n", type=int, default=400, help="synthetic images (70%% train, 15%% val)")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="without/with pairs, alternating")
    ap.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.n, args.size, args.epochs, args.repeats = 120, 64, 3, 1
    import torch

    handler = _FeaturePass()
    logging.getLogger("visionflow.training.feature_cache").addHandler(handler)
    logging.getLogger("visionflow.training.feature_cache").setLevel(logging.INFO)
    work = args.dir or Path(tempfile.mkdtemp(prefix="visionflow-feature-cache-"))
    try:
        params_file = make_project(work / "project", args.n, args.size, args.epochs, args.batch, args.arch)
        print(f"{len(os.sched_getaffinity(0))} cores, torch {torch.__version__}; {args.arch} feature_extract, "
              f"{args.n} images at {args.size} px, batch {args.batch}, {args.epochs} epochs, augment none; "
              f"{args.repeats} x (without, with)", flush=True)
        runs: dict[str, list[dict]] = {"without": [], "with": []}
        for _ in range(args.repeats):
            for name in ("without", "with"):
                runs[name].append(train(params_file, name == "with"))
                r = runs[name][-1]
                print(f"  {name:7s}: epochs {[round(s, 3) for s in r['epochs']]} s, train stage {r['wall']:.2f} s",
                      flush=True)
        head = max((abs(a - b).max().item() for k, a in runs["without"][0]["state"].items()
                    for b in [runs["with"][0]["state"][k]]), default=0.0)
        without = statistics.median(epoch_seconds(r["epochs"]) for r in runs["without"])
        with_ = statistics.median(epoch_seconds(r["epochs"]) for r in runs["with"])
        walls = {k: statistics.median(r["wall"] for r in v) for k, v in runs.items()}
        feature_pass = statistics.median(handler.seconds) if handler.seconds else float("nan")
        print(f"epoch without the cache {without:8.3f} s")
        print(f"epoch with the cache    {with_:8.3f} s   ratio {without / with_:7.1f}x (goal >= 5x)")
        print(f"feature pass (once)     {feature_pass:8.3f} s")
        print(f"train stage, {args.epochs} epochs: without {walls['without']:.2f} s, with {walls['with']:.2f} s "
              f"({walls['without'] / walls['with']:.1f}x)")
        print(f"largest weight difference between the two saved models: {head:.2e}")
        if args.out:
            args.out.write_text(json.dumps({
                "arch": args.arch, "n": args.n, "size": args.size, "epochs": args.epochs, "batch": args.batch,
                "epoch_without_s": round(without, 4), "epoch_with_s": round(with_, 4),
                "ratio": round(without / with_, 2), "feature_pass_s": round(feature_pass, 3),
                "stage_without_s": round(walls["without"], 2), "stage_with_s": round(walls["with"], 2),
                "max_weight_diff": head}, indent=2) + "\n")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
