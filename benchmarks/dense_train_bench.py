"""Dense-task training throughput on a CUDA GPU: AMP against fp32, channels_last against not.

For Faster R-CNN R50-FPN v2 (detect) and DeepLabV3-R50 (segment) at 512 px, it times the
engine's own training step (visionflow.training.engine.train_one_epoch: autocast, GradScaler,
gradient clipping, AdamW, the LR schedule) on synthetic batches held in GPU memory, so the
figure is the model's step rate, not the data loader's. Four variants per model, in the same
run: fp32, fp32 + channels_last, AMP, AMP + channels_last. Printed and written as JSON:
images/s of each, and the ratio of each to fp32 (the reference). The GPU model is named.

    .venv/bin/python benchmarks/dense_train_bench.py --out /tmp/dense.json     # on a GPU box
    .venv/bin/python benchmarks/dense_train_bench.py --device cpu --size 128 --steps 2 --warmup 1 --batch 2
                                                            # CPU smoke run (checks it works)
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from visionflow.core.config import ModelParams, TrainParams
from visionflow.training.engine import FitConfig, build_optimizer, build_scheduler, train_one_epoch
from visionflow.tasks import get_task

MODELS = {"detect": "fasterrcnn_resnet50_fpn_v2", "segment": "deeplabv3_resnet50"}
NUM_CLASSES = 5


def _batch(task: str, batch: int, size: int, device: torch.device, gen: torch.Generator):
    images = torch.rand(batch, 3, size, size, generator=gen).to(device)
    if task == "segment":
        targets = torch.randint(0, NUM_CLASSES + 1, (batch, size, size), generator=gen).to(device)
        return images, targets
    targets = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=gen) * size * 0.6
        wh = 16 + torch.rand(4, 2, generator=gen) * size * 0.3
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).clamp(max=size - 1).to(device),
                        "labels": torch.randint(1, NUM_CLASSES + 1, (4,), generator=gen).to(device)})
    return images, targets


def bench_one(task_name: str, size: int, batch: int, steps: int, warmup: int, amp: bool, channels_last: bool,
              device: torch.device) -> float:
    task = get_task(task_name)
    params = TrainParams(model=ModelParams(arch=MODELS[task_name]), image_size=size, batch_size=batch)
    model = task.build_model(params, NUM_CLASSES, pretrained=False).to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    data = [_batch(task_name, batch, size, device, gen) for _ in range(2)]
    cfg = FitConfig(epochs=1, lr=1e-4)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = build_scheduler(optimizer, 1, warmup + steps, 0)
    amp_dtype = None
    if amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif amp:
        amp_dtype = torch.bfloat16  # CPU autocast, for the smoke run
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def run(n: int) -> None:
        loader = [data[i % len(data)] for i in range(n)]
        train_one_epoch(task, model, loader, optimizer, scheduler, scaler, device, amp_dtype, 5.0, 0, channels_last)

    run(warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tasks", nargs="+", default=list(MODELS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures GPU training (use --device cpu for a smoke run)")
    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    report = {"device": gpu, "torch": torch.__version__, "size": args.size, "batch": args.batch,
              "steps": args.steps, "bf16": device.type == "cuda" and torch.cuda.is_bf16_supported(), "results": {}}
    print(f"device: {gpu}; {args.size} px, batch {args.batch}, {args.steps} timed steps after {args.warmup}")
    for task in args.tasks:
        rows = {}
        for amp in (False, True):
            for cl in (False, True):
                name = f"{'amp' if amp else 'fp32'}{' + channels_last' if cl else ''}"
                rows[name] = bench_one(task, args.size, args.batch, args.steps, args.warmup, amp, cl, device)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        ref = rows["fp32"]
        report["results"][MODELS[task]] = {k: {"images_per_s": round(v, 2), "ratio_to_fp32": round(v / ref, 3)}
                                           for k, v in rows.items()}
        for k, v in rows.items():
            print(f"  {MODELS[task]:28s} {k:24s} {v:8.2f} images/s  x{v / ref:.2f} vs fp32")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
