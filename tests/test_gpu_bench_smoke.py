"""benchmarks/gpu/gpu_bench.py --smoke: every section of the GPU benchmark runs on the CPU
(tiny sizes, a real torchrun with gloo) and reports every figure as a positive number.
A check that the code paths work, not a timing assertion: the figures themselves mean nothing."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# about 110 s on 2 idle cores, twice that beside another test: ResNet-50, Faster R-CNN and DeepLabV3
# builds and steps (bfloat16 autocast on a CPU is 10-20x slower than float32), a torchrun start
pytestmark = pytest.mark.slow


def test_gpu_bench_smoke_reports_every_figure(tmp_path):
    out = tmp_path / "gpu_bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "gpu_bench.py"), "--smoke",
                           "--device", "cpu", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["errors"] == {}

    figures = report["figures"]
    expected = ["resnet50.fp32_images_per_s", "resnet50.amp_images_per_s", "resnet50.amp_engine_images_per_s",
                "resnet50.ratio_amp_to_fp32",
                "loader.workers_0_images_per_s", "loader.workers_2_images_per_s",
                "loader.workers_0_ratio_to_gpu", "loader.workers_2_ratio_to_gpu",
                "ddp.images_per_s", "ddp.first_epoch_images_per_s", "ddp.world_size", "ddp.data_wait"]
    for arch in ("fasterrcnn_resnet50_fpn_v2", "deeplabv3_resnet50"):
        expected += [f"dense.{arch}.fp32_images_per_s", f"dense.{arch}.amp_images_per_s",
                     f"dense.{arch}.ratio_amp_to_fp32"]
    missing = sorted(set(expected) - set(figures))
    assert not missing, f"missing figures: {missing}"
    shares = {"ddp.data_wait"}  # a share of the training pass: 0 when the loader never kept it waiting
    bad = {k: v for k, v in figures.items() if not (isinstance(v, (int, float)) and math.isfinite(v)
                                                    and (0 <= v <= 1 if k in shares else v > 0))}
    assert not bad, f"figures that are not positive numbers (shares: in [0, 1]): {bad}"

    assert report["ddp"]["completed"] and report["ddp"]["world_size"] == 1 and report["ddp"]["backend"] == "gloo"
    assert {w["verdict"] for w in report["loader"]["workers"].values()} <= {"fed", "starved"}
    assert "NVIDIA's published A100 figure: 2,470 img/s AMP" in proc.stdout
