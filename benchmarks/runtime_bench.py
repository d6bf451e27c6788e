"""onnxruntime against PyTorch eager inference, per task, side by side in one run.

For each task (classify, segment, multilabel; detect has no ONNX export) it builds a model
folder with the architecture and input size of the repository's params.yaml (random weights, no
download; or a trained folder with --model-dir: the model's latency depends on the architecture
and size, the segmenter's post-processing also on how many class edges its masks have), exports it to
ONNX through the project's own export path (visionflow.deploy.export.export_model, which runs
the file at batch 1 and 3 against PyTorch before keeping it), and then times, on the same
synthetic shape images (visionflow.datasets.synth, --image-px square PNGs decoded to RGB):

    torch  visionflow.deploy.predictor.ModelPredictor.predict  (what `predict --runtime torch` runs)
    onnx   visionflow.deploy.runtime.OnnxPredictor.predict     (what `predict --runtime onnx` runs)

end to end (resize, normalisation, the model, post-processing back to each image's size), at
each --batches size, in alternating order round by round (so both see the same machine load).
Reported per task and batch: median ms per batch, images/s, and the ratio torch / onnx (how many
times faster onnxruntime is). Both runtimes use the same intra-op threads (--threads, default
torch's: OMP_NUM_THREADS, else the cores). The predictions of both are compared as well
(classify labels, segment mask pixels), so a fast wrong answer would show.

    .venv/bin/python benchmarks/runtime_bench.py --out /tmp/runtime.json
    .venv/bin/python benchmarks/runtime_bench.py --tasks classify --batches 1 8 --rounds 30 --threads 2
    .venv/bin/python benchmarks/runtime_bench.py --tasks segment --model-dir segment=models/segment --image-px 640
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TASKS = ("classify", "segment", "multilabel")
CLASSES = ["circle", "square", "triangle", "star", "cross"]


def make_model_dir(root: Path, task: str) -> Path:
    """A model folder as the train stage writes it, with the repository's architecture for `task`
    and random weights."""
    import albumentations as A
    import torch

    from visionflow.core.config import load_params
    from visionflow.core.files import write_json
    from visionflow.tasks import get_task

    train = load_params(REPO / "params.yaml").branch(task).train
    model = train.model.model_copy(update={"weights": None, "backbone_weights": None})
    params = train.model_copy(update={"model": model})
    t = get_task(task, params)
    torch.manual_seed(0)
    net = t.build_model(params, len(CLASSES), pretrained=False)
    root.mkdir(parents=True)
    torch.save(net.state_dict(), root / "model.pt")
    write_json(root / "meta.json", {"task": task, "arch": model.arch, "num_classes": len(CLASSES), "classes": CLASSES,
                                    "image_size": params.image_size, "mean": [0.485, 0.456, 0.406],
                                    "std": [0.229, 0.224, 0.225], "params": params.model_dump(mode="json")})
    write_json(root / "augment.json", A.to_dict(t.build_transforms(params)[0]))
    return root


def images(n: int, px: int) -> list[np.ndarray]:
    from visionflow.datasets.synth import render_image

    return [np.asarray(render_image(seed=123, index=i, size=px)[0].convert("RGB")) for i in range(n)]


def agreement(task: str, a: list[dict], b: list[dict]) -> float:
    if task == "segment":
        return float(np.mean([(x["mask"] == y["mask"]).mean() for x, y in zip(a, b)]))
    key = "label" if task == "classify" else "labels"
    return float(np.mean([x[key] == y[key] for x, y in zip(a, b)]))


def bench_task(task: str, tmp: Path, args) -> dict:
    from visionflow.deploy.export import export_model
    from visionflow.deploy.predictor import load_predictor
    from visionflow.deploy.runtime import OnnxPredictor

    model_dir = args.model_dir.get(task) or make_model_dir(tmp / task, task)
    t0 = time.perf_counter()
    info = export_model(model_dir, "onnx", tmp / f"{task}.onnx")
    export_s = time.perf_counter() - t0
    torch_model = load_predictor(model_dir)
    onnx_model = OnnxPredictor(info["path"], torch_model.meta, threads=args.threads)
    pool = images(max(args.batches), args.image_px)
    runners = {"torch": torch_model.predict, "onnx": onnx_model.predict}
    out = {"arch": torch_model.meta["arch"], "image_size": torch_model.meta["image_size"],
           "export_s": round(export_s, 1), "self_check_max_abs_diff": info["parity"]["self_check"]["max_abs_diff"],
           "providers": onnx_model.providers, "batches": {}}
    for batch in args.batches:
        x = pool[:batch]
        agree = agreement(task, runners["torch"](x, batch_size=batch), runners["onnx"](x, batch_size=batch))
        times: dict[str, list[float]] = {"torch": [], "onnx": []}
        for _ in range(args.warmup):
            for run in runners.values():
                run(x, batch_size=batch)
        for r in range(args.rounds):
            for name in (("torch", "onnx") if r % 2 == 0 else ("onnx", "torch")):
                start = time.perf_counter()
                runners[name](x, batch_size=batch)
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        out["batches"][str(batch)] = {
            "torch_ms": round(med["torch"], 2), "onnx_ms": round(med["onnx"], 2),
            "torch_img_s": round(batch * 1000 / med["torch"], 1), "onnx_img_s": round(batch * 1000 / med["onnx"], 1),
            "ratio": round(med["torch"] / med["onnx"], 2), "agreement": round(agree, 4), "rounds": args.rounds}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per runtime and batch (default 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--image-px", type=int, default=128, help="size of the synthetic input images (default 128; "
                    "the model resizes them to its image_size)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of both runtimes "
                    "(default: torch's, OMP_NUM_THREADS or the cores)")
    ap.add_argument("--model-dir", nargs="+", default=[], metavar="TASK=DIR",
                    help="time a trained model folder (as the train stage writes it, e.g. segment=models/segment "
                         "after `visionflow run`) in place of random weights: the segmenter's post-processing "
                         "depends on its masks (class edges), not only on the architecture")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    try:
        args.model_dir = {task: Path(folder) for task, folder in (m.split("=", 1) for m in args.model_dir)}
    except ValueError:
        ap.error("--model-dir takes TASK=DIR, e.g. segment=models/segment")
    for task, folder in args.model_dir.items():
        if task not in TASKS or not (folder / "meta.json").is_file():
            ap.error(f"--model-dir {task}={folder}: not a task with an ONNX export ({', '.join(TASKS)}) "
                     "and a model folder with meta.json")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"threads": torch.get_num_threads(), "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="runtime-bench-") as tmp:
        for task in args.tasks:
            results["tasks"][task] = bench_task(task, Path(tmp), args)
    results["machine"] = {"cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "onnxruntime": __import__("onnxruntime").__version__}
    print(f"threads {results['threads']}, load average at the end {results['machine']['load_avg_1m_at_end']}")
    print(f"{'task':<11} {'arch':<13} {'px':>4} {'batch':>5} {'torch ms':>9} {'onnx ms':>8} {'torch img/s':>11} "
          f"{'onnx img/s':>10} {'onnx speed-up':>13} {'agree':>6}")
    for task, r in results["tasks"].items():
        for batch, b in r["batches"].items():
            print(f"{task:<11} {r['arch']:<13} {r['image_size']:>4} {batch:>5} {b['torch_ms']:>9} {b['onnx_ms']:>8} "
                  f"{b['torch_img_s']:>11} {b['onnx_img_s']:>10} {b['ratio']:>12}x {b['agreement']:>6}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
