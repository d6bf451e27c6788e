"""Detection on mixed-size batches (`train.resize: fit`) against letterboxed square batches
(`letterbox`), side by side in one run: the same detector (the repository's params.yaml detect
architecture, random weights, nothing downloaded), the same photos, the same boxes.

    letterbox  each photo's longest side to --size, padded to a --size x --size square
    fit        each photo's longest side to --size, unpadded; a batch is padded at the bottom and
               right to its largest photo only (landscape photos: --size x 0.56 --size at 16:9)

Timed, in alternating order round by round: training steps (the task's loss, backward, AdamW
step) on batches of --batch photos, and prediction (`Task.predict`: eval transform, model, boxes
back to each photo's pixels) of the same batches. Reported: median ms of each, the model inputs'
sizes and the ratio letterbox / fit (how many times faster fit is). --aspect picks the photos'
shape: 16:9 (default) is one batch of landscape photos; `mixed` is two batches' worth of 16:9
landscape and 3:4 portrait photos in turn, and adds a third side, `fit+grouped`: the same photos
batched by orientation (`AspectBatchSampler` for training, `ModelPredictor.batches` for
prediction, what `aspect_grouping` does), where plain fit pads each mixed batch back to a square.

    .venv/bin/python benchmarks/fit_bench.py                        # 320 px, batch 4, 16:9
    .venv/bin/python benchmarks/fit_bench.py --size 512 --aspect mixed
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def photos(n: int, aspect: str, size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """n (image, boxes) pairs at 2x --size on the long side: noise with a few bright rectangles."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        landscape = aspect == "16:9" or (aspect == "mixed" and i % 2 == 0)
        w, h = (2 * size, round(2 * size * 9 / 16)) if landscape else (round(2 * size * 3 / 4), 2 * size)
        image = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
        boxes = []
        for _ in range(3):
            bw, bh = rng.integers(w // 10, w // 4), rng.integers(h // 10, h // 4)
            x1, y1 = rng.integers(0, w - bw), rng.integers(0, h - bh)
            image[y1:y1 + bh, x1:x1 + bw] = rng.integers(150, 255, 3)
            boxes.append([x1, y1, x1 + bw, y1 + bh])
        out.append((image, np.asarray(boxes, np.float32)))
    return out


def setup(resize: str, size: int):
    import yaml

    from visionflow.core.config import TrainParams
    from visionflow.tasks import get_task

    raw = yaml.safe_load((REPO / "params.yaml").read_text())["detect"]["train"]
    raw["model"].update(weights=None, backbone_weights=None)
    params = TrainParams.model_validate({**raw, "image_size": size, "resize": resize,
                                         "augment": {"preset": "none", "transforms": None}})
    task = get_task("detect", params)
    torch.manual_seed(0)
    model = task.build_model(params, num_classes=2, pretrained=False)
    return task, params, model


def batch_of(task, params, data):
    train_tf = task.build_transforms(params)[0]
    items = []
    for image, boxes in data:
        out = train_tf(image=image, bboxes=boxes, labels=[1] * len(boxes), instance_ids=list(range(len(boxes))))
        target = {"boxes": torch.tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4)),
                  "labels": torch.ones(len(out["bboxes"]), dtype=torch.int64)}
        items.append((torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))), target))
    return task.collate(items)


def main() -> None:
    from visionflow.deploy.predictor import ModelPredictor
    from visionflow.training.loader import AspectBatchSampler

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--aspect", default="16:9", choices=["16:9", "mixed"])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    mixed = args.aspect == "mixed"
    data = photos(args.batch * (2 if mixed else 1), args.aspect, args.size)
    images = [im for im, _ in data]
    in_turn = [list(range(k, min(k + args.batch, len(data)))) for k in range(0, len(data), args.batch)]
    plan = {"letterbox": ("letterbox", in_turn), "fit": ("fit", in_turn)}
    if mixed:
        landscape = [im.shape[1] >= im.shape[0] for im in images]
        train_batches = AspectBatchSampler(landscape, args.batch, seed=0).batches()
        grouper = ModelPredictor.__new__(ModelPredictor)  # its batching rule only
        grouper.resize = "fit"
        plan["fit+grouped"] = ("fit", (train_batches, grouper.batches(images, args.batch)))
    sides = {}
    for name, (resize, batches) in plan.items():
        train_idx, predict_idx = batches if isinstance(batches, tuple) else (batches, batches)
        task, params, model = setup(resize, args.size)
        sides[name] = dict(task=task, params=params, model=model,
                           batches=[batch_of(task, params, [data[k] for k in b]) for b in train_idx],
                           predict_sets=[[images[k] for k in b] for b in predict_idx],
                           opt=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4),
                           eval_tf=task.build_transforms(params)[1], train=[], predict=[])

    def train_step(s):
        s["model"].train()
        for x, targets in s["batches"]:
            loss = sum(s["task"].loss(s["model"], x, targets).values())
            s["opt"].zero_grad(set_to_none=True)
            loss.backward()
            s["opt"].step()

    def predict(s):
        for batch in s["predict_sets"]:
            s["task"].predict(s["model"], batch, s["eval_tf"], torch.device("cpu"))

    for s in sides.values():  # warm-up
        train_step(s)
        predict(s)
    names = list(sides)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            s = sides[name]
            for what, run in (("train", train_step), ("predict", predict)):
                t0 = time.perf_counter()
                run(s)
                s[what].append(time.perf_counter() - t0)
    med = {n: {k: statistics.median(s[k]) * 1000 for k in ("train", "predict")} for n, s in sides.items()}
    print(f"detect {sides['fit']['params'].model.arch} on {sides['fit']['params'].model.backbone}, {len(data)} photos "
          f"({args.aspect}) in batches of {args.batch}, --size {args.size}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    for name, s in sides.items():
        shapes = ", ".join(f"{tuple(x.shape[2:])}" for x, _ in s["batches"])
        print(f"  {name:<11} inputs {shapes}: train steps {med[name]['train']:8.1f} ms, "
              f"predict {med[name]['predict']:8.1f} ms")
    for name in names[1:]:
        print(f"  letterbox / {name}: train {med['letterbox']['train'] / med[name]['train']:.2f}x, "
              f"predict {med['letterbox']['predict'] / med[name]['predict']:.2f}x")


if __name__ == "__main__":
    main()
