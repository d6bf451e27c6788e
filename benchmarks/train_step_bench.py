"""Train-step throughput: visionflow's training step against a plain torchvision-reference loop,
same model, batch, image size and precision, measured side by side in one run (issue 12,
benchmark 2; goal: ratio >= 1.0).

What each side runs, on the same pre-built batches (so the data loader is not measured here;
benchmarks/loader_bench.py measures it):

  visionflow  the task's model (`Task.build_model`, random init) trained by the engine's own
              `train_one_epoch` (visionflow.training.engine): the task's loss, AdamW, the LR
              scheduler, the GradScaler (disabled off fp16), gradient clipping at `--grad-clip`,
              the NaN guard and the per-step loss bookkeeping
  reference   the same torchvision architecture built directly with the same constructor
              arguments, trained by the loop of torchvision's references/ (classification,
              segmentation, detection train.py): forward, loss, zero_grad, backward, the
              references' `--clip-grad-norm` at the same `--grad-clip`, step

`--grad-clip` (default 5.0, visionflow's default `train.grad_clip`; 0: off) is applied on both
sides, so the ratio compares the loops doing the same work.

Tasks (`--tasks`): classify (resnet18), segment (lraspp_mobilenet_v3_large) and detect
(fasterrcnn_mobilenet_v3_large_fpn; both sides get visionflow's area-scaled proposal counts, so
the model is the same). Each side runs `--rounds` rounds of `--steps` steps, alternating with the
other, after `--warmup` untimed steps. Printed: the median images/s of each side, and the ratio
as the median of the rounds' own ratios (each round's two sides ran back to back, so a slow
minute of this shared machine hits both), with their range. Precision: fp32 on the CPU; with
CUDA, both sides use the same autocast dtype. Both sides make their optimizer once and keep it
across the rounds.

    .venv/bin/python benchmarks/train_step_bench.py                 # ~3 min on 2 cores
    .venv/bin/python benchmarks/train_step_bench.py --tasks classify --size 224 --batch 64
Run it on an otherwise quiet machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from visionflow.core.config import ModelParams, TrainParams  # noqa: E402
from visionflow.tasks import get_task  # noqa: E402
from visionflow.training.engine import build_optimizer, build_scheduler, FitConfig, train_one_epoch  # noqa: E402

ARCH = {"classify": "resnet18", "segment": "lraspp_mobilenet_v3_large", "detect": "fasterrcnn_mobilenet_v3_large_fpn"}
CLASSES = 5


def batches(task: str, n: int, batch: int, size: int, seed: int = 0) -> list:
    """`n` batches as the task's collate makes them (normalised images; its targets)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if task == "detect":  # detectors normalise inside: images 0..1
            images = torch.rand(batch, 3, size, size, generator=g)
            targets = []
            for _ in range(batch):
                xy = torch.rand(3, 2, generator=g) * (size * 0.6)
                wh = 8 + torch.rand(3, 2, generator=g) * (size * 0.3)
                targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                                "labels": torch.randint(1, CLASSES + 1, (3,), generator=g)})
        else:
            images = torch.randn(batch, 3, size, size, generator=g)
            shape = (batch,) if task == "classify" else (batch, size, size)
            targets = torch.randint(0, CLASSES + (task == "segment"), shape, generator=g)
        out.append((images, targets))
    return out


def reference_model(task: str, ours: torch.nn.Module, size: int) -> torch.nn.Module:
    import torchvision

    if task == "classify":
        return torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    if task == "segment":
        return torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                          num_classes=CLASSES + 1)
    from visionflow.models.detectors import _rcnn_kwargs

    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=CLASSES + 1,
        **_rcnn_kwargs(ModelParams(arch=ARCH[task]), size))


def reference_loss(task: str, model, images, targets) -> torch.Tensor:
    """The loss as torchvision's references/<task>/train.py computes it."""
    if task == "classify":
        return F.cross_entropy(model(images), targets)
    if task == "segment":
        return F.cross_entropy(model(images)["out"], targets, ignore_index=255)
    return sum(model(list(images), targets).values())


def our_optimizer(model, device, amp_dtype, steps_per_epoch: int, grad_clip: float) -> tuple:
    """The engine's optimizer, scheduler and GradScaler, made once and kept across rounds as the
    reference keeps its optimizer: a fresh AdamW each round would allocate and zero its state
    (two tensors the size of the weights) in every round's first step, on visionflow's side only."""
    cfg = FitConfig(epochs=1, lr=1e-3, grad_clip=grad_clip)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    sched = build_scheduler(opt, 1000, steps_per_epoch, 0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return opt, sched, scaler


def time_ours(task, model, data, device, amp_dtype, optimizer: tuple, grad_clip: float) -> float:
    opt, sched, scaler = optimizer
    t0 = time.perf_counter()
    train_one_epoch(task, model, data, opt, sched, scaler, device, amp_dtype, grad_clip, 1)
    sync(device)
    return time.perf_counter() - t0


def time_reference(task, model, data, device, amp_dtype, opt, grad_clip: float) -> float:
    model.train()
    t0 = time.perf_counter()
    for images, targets in data:
        images = images.to(device, non_blocking=True)
        targets = ([{k: v.to(device) for k, v in t.items()} for t in targets] if task == "detect"
                   else targets.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = reference_loss(task, model, images, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:  # references/classification/train.py's --clip-grad-norm
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
    sync(device)
    return time.perf_counter() - t0


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(task: str, size: int, batch: int, steps: int, rounds: int, warmup: int, device,
          grad_clip: float = 5.0) -> dict:
    torch.manual_seed(0)
    params = TrainParams(model=ModelParams(arch=ARCH[task]), image_size=size, batch_size=batch)
    vf_task = get_task(task, params)
    ours = vf_task.build_model(params, CLASSES, pretrained=False).to(device)
    ref = reference_model(task, ours, size).to(device)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=1e-4)
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else None
    data = batches(task, steps, batch, size)
    our_opt = our_optimizer(ours, device, amp_dtype, steps, grad_clip)
    time_ours(vf_task, ours, data[:warmup], device, amp_dtype, our_opt, grad_clip)
    time_reference(task, ref, data[:warmup], device, amp_dtype, ref_opt, grad_clip)
    rates: dict[str, list[float]] = {"visionflow": [], "reference": []}
    for r in range(rounds):
        order = ("visionflow", "reference") if r % 2 == 0 else ("reference", "visionflow")
        for side in order:
            if side == "visionflow":
                seconds = time_ours(vf_task, ours, data, device, amp_dtype, our_opt, grad_clip)
            else:
                seconds = time_reference(task, ref, data, device, amp_dtype, ref_opt, grad_clip)
            rates[side].append(steps * batch / seconds)
    ours_rate, ref_rate = (statistics.median(rates[k]) for k in ("visionflow", "reference"))
    per_round = [a / b for a, b in zip(rates["visionflow"], rates["reference"])]
    return {"task": task, "arch": ARCH[task], "size": size, "batch": batch, "params": (n_ours, n_ref),
            "visionflow": ours_rate, "reference": ref_rate, "ratio": statistics.median(per_round),
            "ratio_range": (min(per_round), max(per_round))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="classify,segment,detect")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--grad-clip", type=float, default=5.0, help="max gradient norm on both sides (0: off)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rounds} alternating rounds of {args.steps} steps, batch {args.batch}, {args.size} px, "
          f"grad clip {args.grad_clip or 'off'} on both sides")
    print(f"{'task':9} {'arch':36} {'params (ours/ref)':>21} {'visionflow img/s':>17} {'reference img/s':>16} "
          f"{'ratio':>6}  rounds' range")
    rows = []
    for task in args.tasks.split(","):
        r = bench(task, args.size, args.batch, args.steps, args.rounds, args.warmup, device, args.grad_clip)
        rows.append(r)
        print(f"{r['task']:9} {r['arch']:36} {r['params'][0]:>10,}/{r['params'][1]:<10,} "
              f"{r['visionflow']:>17.1f} {r['reference']:>16.1f} {r['ratio']:>6.2f}  "
              f"{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(),
                                        "grad_clip": args.grad_clip, "steps": args.steps, "rounds": args.rounds,
                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
