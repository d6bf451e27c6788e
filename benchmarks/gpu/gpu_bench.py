"""The project's one GPU benchmark: four figures, each measured side by side in one run.

1. ResNet-50 (torchvision, random init) training images/s at 224 px, batch 256, synthetic
   tensors already on the GPU: fp32 against AMP (bf16 autocast) + channels_last, and the same
   AMP step through visionflow's engine (train_one_epoch: AdamW, gradient clipping, a loss read
   per step). Warm-up steps, then timed steps between torch.cuda.synchronize() calls.
2. Faster R-CNN R50-FPN v2 and DeepLabV3-R50 train steps at 512 px, fp32 against AMP (and
   each with channels_last), timed by benchmarks/dense_train_bench.py's bench_one.
3. The data loader against the GPU: a folder of 640x480 JPEG photos (noise + shapes), read by
   visionflow's classification dataset with the training transform (resize to 224, the
   `light` preset, normalisation) and the task's collate, through the train stage's own
   build_loaders (pinned memory and uint8 batches on CUDA), for several num_workers; each rate
   is compared with figure 1's AMP rate
   ("fed" when the loader delivers at least what the GPU consumes, else "starved").
4. A 1-node DDP run: `torchrun --standalone --nproc-per-node 1` of benchmarks/gpu/ddp_worker.py
   (NCCL on CUDA, gloo on the CPU), visionflow.training.engine.fit on those JPEGs with the real loader.

    bash benchmarks/gpu/run.sh                        # on a GPU box (under 8 minutes on an H200)
    bash benchmarks/gpu/run.sh --smoke                # CPU check of every code path, tiny sizes
    .venv/bin/python benchmarks/gpu/gpu_bench.py --smoke --json /tmp/gpu.json

Printed as tables; with --json, every figure is also written there (and a flat "figures" map).
A section that fails is reported and the others still run; the exit code is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/: dense_train_bench
try:
    import visionflow  # noqa: F401
except ImportError:  # run without PYTHONPATH=src (run.sh sets it)
    sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

A100_AMP_IMAGES_PER_S = 2470
ANCHOR = "NVIDIA's published A100 figure: 2,470 img/s AMP"
SECTIONS = ("resnet50", "dense", "loader", "ddp")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def settings(smoke: bool) -> dict:
    """Sizes of each section. The smoke run takes every code path with tiny sizes."""
    if smoke:  # dense at 64 px: at 128 px their bfloat16 CPU steps took 135 of the smoke run's 171 s
        return {"rn_batch": 4, "rn_size": 64, "rn_warmup": 1, "rn_steps": 1,
                "dense_size": 64, "dense_batch": 2, "dense_warmup": 1, "dense_steps": 1,
                "n_files": 16, "width": 640, "height": 480, "workers": [0, 2], "min_measure": 2,
                "ddp_arch": "resnet50", "ddp_epochs": 2, "ddp_steps": 2}
    return {"rn_batch": 256, "rn_size": 224, "rn_warmup": 10, "rn_steps": 30,
            "dense_size": 512, "dense_batch": 8, "dense_warmup": 5, "dense_steps": 20,
            "n_files": 384, "width": 640, "height": 480,
            "workers": sorted({0, 4, 8, max(1, _cpus() - 1)}), "min_measure": 4,
            "ddp_arch": "resnet50", "ddp_epochs": 3, "ddp_steps": 24}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), "  " + "-+-".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def amp_dtype_for(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


# --- 1. ResNet-50 --------------------------------------------------------------------------

def resnet50_rate(device: torch.device, batch: int, size: int, warmup: int, steps: int, amp: bool,
                  engine: bool) -> float:
    """Training images/s of ResNet-50 on one fixed batch held on `device`. AMP runs use
    channels_last on CUDA (as the engine does). engine=True times visionflow.training.engine's step."""
    import torch.nn.functional as F
    import torchvision

    from visionflow.training.engine import FitConfig, build_optimizer, build_scheduler, train_one_epoch
    from visionflow.tasks import get_task

    channels_last = amp and device.type == "cuda"
    model = torchvision.models.resnet50(weights=None).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    dtype = amp_dtype_for(device) if amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    if engine:
        task = get_task("classify")
        cfg = FitConfig(epochs=1, lr=1e-4)
        optimizer = build_optimizer(model.parameters(), cfg)
        scheduler = build_scheduler(optimizer, 1, warmup + steps, 0)

        def run(n: int) -> None:
            train_one_epoch(task, model, [(images, targets)] * n, optimizer, scheduler, scaler, device, dtype,
                            cfg.grad_clip, 0, channels_last)
    else:  # the plain loop of published ResNet-50 training figures: SGD with momentum
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        model.train()

        def run(n: int) -> None:
            for _ in range(n):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = F.cross_entropy(model(images), targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

    run(warmup)
    sync(device)
    t0 = time.perf_counter()
    run(steps)
    sync(device)
    rate = steps * batch / (time.perf_counter() - t0)
    model = optimizer = images = None  # the GPU memory goes (the closure `run` shares these cells)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rate


def section_resnet50(cfg: dict, device: torch.device, report: dict, figures: dict) -> None:
    b, s = cfg["rn_batch"], cfg["rn_size"]
    print(f"\n== 1. ResNet-50 training, {s} px, batch {b}, synthetic batch on {device.type}: "
          f"{cfg['rn_warmup']} warm-up + {cfg['rn_steps']} timed steps")
    if device.type == "cuda":
        print(f"   fp32 is PyTorch's default: cuDNN convolutions may use TF32 "
              f"(torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
              f"matmul allow_tf32={torch.backends.cuda.matmul.allow_tf32})")
    amp_name = f"amp {str(amp_dtype_for(device)).replace('torch.', '')}" + (" + channels_last" if device.type == "cuda" else "")
    rows = {
        "fp32": resnet50_rate(device, b, s, cfg["rn_warmup"], cfg["rn_steps"], amp=False, engine=False),
        amp_name: resnet50_rate(device, b, s, cfg["rn_warmup"], cfg["rn_steps"], amp=True, engine=False),
        f"{amp_name}, visionflow engine step": resnet50_rate(device, b, s, cfg["rn_warmup"], cfg["rn_steps"],
                                                             amp=True, engine=True),
    }
    fp32, amp, eng = rows.values()
    print(table(["variant", "images/s", "x fp32"], [[k, f"{v:,.1f}", f"{v / fp32:.2f}"] for k, v in rows.items()]))
    print(f"   AMP / fp32 = {amp / fp32:.2f}x;  engine step (AdamW, gradient clipping, a loss read per step) "
          f"/ plain AMP step (SGD) = {eng / amp:.2f}")
    print(f"   {ANCHOR} (this run's AMP: {amp:,.0f} img/s = {amp / A100_AMP_IMAGES_PER_S:.2f}x that figure; "
          f"NVIDIA's setup differs: its own recipe, DALI input)")
    report["resnet50"] = {"image_size": s, "batch": b, "warmup": cfg["rn_warmup"], "steps": cfg["rn_steps"],
                          "variants": {k: round(v, 2) for k, v in rows.items()},
                          "fp32_images_per_s": round(fp32, 2), "amp_images_per_s": round(amp, 2),
                          "amp_engine_images_per_s": round(eng, 2), "ratio_amp_to_fp32": round(amp / fp32, 3),
                          "ratio_engine_to_amp": round(eng / amp, 3),
                          "a100_published_amp_images_per_s": A100_AMP_IMAGES_PER_S,
                          "ratio_amp_to_a100_published": round(amp / A100_AMP_IMAGES_PER_S, 3)}
    figures.update({"resnet50.fp32_images_per_s": fp32, "resnet50.amp_images_per_s": amp,
                    "resnet50.amp_engine_images_per_s": eng, "resnet50.ratio_amp_to_fp32": amp / fp32})


# --- 2. dense models (benchmarks/dense_train_bench.py) ---------------------------------------

def section_dense(cfg: dict, device: torch.device, report: dict, figures: dict) -> None:
    from dense_train_bench import MODELS, bench_one

    # channels_last is a no-op off CUDA in bench_one, so the CPU smoke run skips those variants
    variants = [(False, False), (False, True), (True, False), (True, True)] if device.type == "cuda" \
        else [(False, False), (True, False)]
    s, b = cfg["dense_size"], cfg["dense_batch"]
    print(f"\n== 2. Dense models, train step of visionflow's engine, {s} px, batch {b}: "
          f"{cfg['dense_warmup']} warm-up + {cfg['dense_steps']} timed steps (benchmarks/dense_train_bench.py)")
    out, rows = {}, []
    for task, arch in MODELS.items():
        rates = {}
        for amp, cl in variants:
            name = f"{'amp' if amp else 'fp32'}{' + channels_last' if cl else ''}"
            rates[name] = bench_one(task, s, b, cfg["dense_steps"], cfg["dense_warmup"], amp, cl, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ref = rates["fp32"]
        out[arch] = {k: {"images_per_s": round(v, 2), "ratio_to_fp32": round(v / ref, 3)} for k, v in rates.items()}
        for k, v in rates.items():
            rows.append([arch, k, f"{v:,.2f}", f"{v / ref:.2f}"])
            key = k.replace(" + ", "_")
            figures[f"dense.{arch}.{key}_images_per_s"] = v
        figures[f"dense.{arch}.ratio_amp_to_fp32"] = rates["amp"] / ref
    print(table(["model", "variant", "images/s", "x fp32"], rows))
    report["dense"] = {"image_size": s, "batch": b, "warmup": cfg["dense_warmup"], "steps": cfg["dense_steps"],
                       "models": out}


# --- 3. data loader against the GPU --------------------------------------------------------

def make_jpegs(folder: Path, n: int, width: int, height: int, classes: int = 5, seed: int = 0) -> list[tuple[str, int]]:
    """`n` photo-like JPEGs: smooth colour noise, grain and a few filled shapes (quality 90)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        low = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(low).resize((width, height), Image.BILINEAR), dtype=np.int16)
        grain = rng.normal(0, 8, (height, width, 3)).astype(np.int16)
        img = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x1, y1 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            x2, y2 = x1 + int(rng.integers(20, width // 2)), y1 + int(rng.integers(20, height // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            kind = int(rng.integers(0, 3))
            if kind == 0:
                draw.ellipse([x1, y1, x2, y2], fill=colour)
            elif kind == 1:
                draw.rectangle([x1, y1, x2, y2], fill=colour)
            else:
                draw.polygon([(x1, y2), ((x1 + x2) // 2, y1), (x2, y2)], fill=colour)
        name = f"{i:05d}.jpg"
        img.save(folder / name, quality=90)
        files.append((name, i % classes))
    return files


def build_samples(folder: Path, files: list[tuple[str, int]], count: int, width: int, height: int):
    """`count` manifest records cycling over the files (the loader reads each one each time)."""
    from visionflow.manifest import Sample

    out = []
    for k in range(count):
        name, label = files[k % len(files)]
        out.append(Sample(id=f"bench/{k:06d}/{name}", root=str(folder), path=name, width=width, height=height,
                          sha256="0" * 64, labels=[label]))
    return out


def loader_rate(folder: Path, files, cfg: dict, workers: int, device: torch.device) -> dict:
    """Images/s that visionflow's classification dataset + collate deliver through the train
    stage's own loaders (`build_loaders`: the seeded sampler, `workers` persistent workers,
    prefetching, the tuned allocator; on CUDA pinned memory, and each uint8 batch copied to the
    device and normalised there). The first `max(1, workers)` batches (one per worker, started
    together) are not timed; then `max(min_measure, 2 x workers)`."""
    from visionflow.core.config import TrainParams
    from visionflow.core.paths import Paths
    from visionflow.stages.train import build_loaders
    from visionflow.tasks import get_task
    from visionflow.training.distributed import SINGLE

    batch = cfg["rn_batch"]
    params = TrainParams(image_size=cfg["rn_size"], batch_size=batch, num_workers=workers)
    task = get_task("classify", params)
    train_tf, eval_tf = task.build_transforms(params)
    skip, measure = max(1, workers), max(cfg["min_measure"], 2 * workers)
    samples = build_samples(folder, files, (skip + measure) * batch, cfg["width"], cfg["height"])
    dataset = task.build_dataset(samples, train_tf, folder)
    loader, _, sampler = build_loaders(task, params, Paths(folder), dataset, task.build_dataset([], eval_tf, folder),
                                       device, SINGLE)
    sampler.set_epoch(0)
    normalize = dataset.device_normalize  # on CUDA: uint8 batches, normalised on the device after the copy
    start = time.perf_counter()
    first = t0 = None
    images_timed = 0
    for i, (images, _labels) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        if normalize is not None:
            images = normalize(images)
        if i == 0:
            sync(device)
            first = time.perf_counter() - start
        if i == skip - 1:
            sync(device)
            t0 = time.perf_counter()
        elif i >= skip:
            images_timed += images.shape[0]
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"images_per_s": images_timed / elapsed, "first_batch_s": first, "timed_images": images_timed,
            "timed_s": elapsed}


def section_loader(cfg: dict, device: torch.device, report: dict, figures: dict, folder: Path, files) -> None:
    gpu = report.get("resnet50", {}).get("amp_images_per_s")
    sizes = [p.stat().st_size for p in folder.glob("*.jpg")]
    print(f"\n== 3. Data loader against the GPU: {len(files)} JPEGs {cfg['width']}x{cfg['height']} "
          f"(mean {np.mean(sizes) / 1024:.0f} KiB), visionflow classify dataset + train transform to "
          f"{cfg['rn_size']} px + collate through the train stage's build_loaders, batch {cfg['rn_batch']}, "
          f"pin_memory={device.type == 'cuda'}, {_cpus()} CPUs")
    if gpu:
        print(f"   GPU consumption: ResNet-50 AMP training at the same size and batch, {gpu:,.1f} images/s (figure 1)")
    else:
        print("   (figure 1 did not run: no GPU rate to compare with)")
    rows, out = [], {}
    for w in cfg["workers"]:
        r = loader_rate(folder, files, cfg, w, device)
        rate = r["images_per_s"]
        ratio = rate / gpu if gpu else None
        verdict = ("fed" if rate >= gpu else "starved") if gpu else "n/a"
        out[str(w)] = {"images_per_s": round(rate, 2), "ratio_to_gpu": round(ratio, 3) if ratio else None,
                       "verdict": verdict, "first_batch_s": round(r["first_batch_s"], 3),
                       "timed_images": r["timed_images"], "timed_s": round(r["timed_s"], 3)}
        rows.append([w, f"{rate:,.1f}", f"{rate / w:,.1f}" if w else "-", f"{ratio:.2f}" if ratio else "-", verdict,
                     f"{r['first_batch_s']:.2f}"])
        figures[f"loader.workers_{w}_images_per_s"] = rate
        if ratio:
            figures[f"loader.workers_{w}_ratio_to_gpu"] = ratio
    print(table(["num_workers", "images/s", "per worker", "x GPU", "verdict", "first batch s"], rows))
    report["loader"] = {"image_size": cfg["rn_size"], "batch": cfg["rn_batch"], "files": len(files),
                        "file_size": f"{cfg['width']}x{cfg['height']}", "mean_file_kib": round(np.mean(sizes) / 1024, 1),
                        "cpus": _cpus(), "pin_memory": device.type == "cuda", "gpu_amp_images_per_s": gpu,
                        "workers": out}


# --- 4. DDP under torchrun ------------------------------------------------------------------

def section_ddp(cfg: dict, device: torch.device, report: dict, figures: dict, folder: Path, files,
                work: Path, nproc: int = 1) -> None:
    from visionflow.manifest import write_manifest
    from visionflow.training.loader import STARVED

    workers = max(cfg["workers"])
    batch = cfg["rn_batch"]
    manifest = work / "ddp_manifest.jsonl"
    write_manifest(manifest, build_samples(folder, files, cfg["ddp_steps"] * batch * nproc, cfg["width"],
                                           cfg["height"]))
    out = work / "ddp_result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE / "ddp_worker.py"), "--manifest", str(manifest), "--root", str(folder),
           "--arch", cfg["ddp_arch"], "--size", str(cfg["rn_size"]), "--batch", str(batch),
           "--workers", str(workers), "--epochs", str(cfg["ddp_epochs"]), "--device", device.type,
           "--out", str(out)]
    print(f"\n== 4. DDP: torchrun --standalone --nproc-per-node {nproc}, visionflow.training.engine.fit, {cfg['ddp_arch']} "
          f"{cfg['rn_size']} px, batch {batch}, {cfg['ddp_epochs']} epochs x {cfg['ddp_steps']} steps, "
          f"{workers} loader workers, AMP + channels_last on CUDA")
    print("   $ python " + " ".join(cmd[1:]), flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    # A machine without a network may give NCCL no interface to bootstrap on: then once more on loopback.
    retry = device.type == "cuda" and "NCCL_SOCKET_IFNAME" not in env
    for extra in [{}] + ([{"NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1"}] if retry else []):
        if extra:
            print(f"   torchrun failed; again with {extra}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env={**env, **extra}, cwd=str(work), timeout=600)
        wall = time.perf_counter() - t0
        if proc.returncode == 0 and out.exists():
            break
    else:
        raise RuntimeError(f"torchrun exited with {proc.returncode}")
    res = json.loads(out.read_text())
    rows = [[e["epoch"], f"{e['seconds']:.2f}", e["images"], f"{e['images_per_s']:,.1f}", f"{e['train_loss']:.3f}",
             f"{100 * e['data_wait']:.0f}%"] for e in res["epochs"]]
    print(table(["epoch", "seconds", "images", "images/s", "train_loss", "waiting for data"], rows))
    print(f"   DDP completed: world size {res['world_size']}, backend {res['backend']}, device {res['device']}; "
          f"{res['images_per_s']:,.1f} images/s over epochs 2-{len(res['epochs'])} "
          f"(epoch 1, the warm-up: {res['first_epoch_images_per_s']:,.1f}); torchrun wall {wall:.1f} s")
    print(f"   the train stage's loaders (persistent, seeded workers; pinned memory and uint8 batches on CUDA); "
          f"from epoch 2 on, rank 0 waited for its next batch {100 * res['data_wait']:.0f}% of the training pass "
          f"({'starved' if res['data_wait'] >= STARVED else 'fed'})")
    gpu = report.get("resnet50", {}).get("amp_engine_images_per_s")
    best_loader = max((v["images_per_s"] for v in report.get("loader", {}).get("workers", {}).values()), default=None)
    if gpu and best_loader:
        print(f"   against: ResNet-50 engine step on a {device.type}-resident batch {gpu:,.1f} images/s "
              f"(figure 1); best loader rate {best_loader:,.1f} (figure 3)")
    res["torchrun_wall_s"] = round(wall, 2)
    report["ddp"] = res
    figures["ddp.images_per_s"] = res["images_per_s"]
    figures["ddp.first_epoch_images_per_s"] = res["first_epoch_images_per_s"]
    figures["ddp.data_wait"] = res["data_wait"]
    figures["ddp.world_size"] = res["world_size"]


# --- main ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and few steps: checks every code path on a CPU")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="num_workers settings of figure 3")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device")
    device = torch.device("cuda" if cuda and args.device != "cpu" else "cpu")
    if device.type == "cpu" and not args.smoke and args.device != "cpu":
        raise SystemExit("no CUDA device: this benchmark measures a GPU; use --smoke for a CPU check of the code paths")
    torch.backends.cudnn.benchmark = True
    cfg = settings(args.smoke)
    if args.workers:
        cfg["workers"] = sorted(set(args.workers))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    import torchvision

    header = {"device": name, "cpus": _cpus(), "python": platform.python_version(), "torch": torch.__version__,
              "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
              "bf16": device.type == "cuda" and torch.cuda.is_bf16_supported(), "smoke": args.smoke}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        header["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    print("visionflow GPU benchmark" + (" (SMOKE: tiny sizes, the figures mean nothing)" if args.smoke else ""))
    print("  " + ", ".join(f"{k} {v}" for k, v in header.items()))
    report: dict = {**header, "settings": cfg, "sections_s": {}, "errors": {}}
    figures: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="visionflow-gpu-bench-") as tmp:
        work = Path(tmp)
        folder, files = work / "images", None

        def run(section: str, fn) -> None:
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as exc:  # report and go on: one device run should give every other figure
                traceback.print_exc()
                print(f"!! section {section} failed: {exc!r}")
                report["errors"][section] = repr(exc)
            finally:
                report["sections_s"][section] = round(time.perf_counter() - t0, 1)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                sys.stdout.flush()

        if "resnet50" in args.sections:
            run("resnet50", lambda: section_resnet50(cfg, device, report, figures))
        if "dense" in args.sections:
            run("dense", lambda: section_dense(cfg, device, report, figures))
        if {"loader", "ddp"} & set(args.sections):
            t0 = time.perf_counter()
            files = make_jpegs(folder, cfg["n_files"], cfg["width"], cfg["height"])
            report["sections_s"]["make_jpegs"] = round(time.perf_counter() - t0, 1)
        if "loader" in args.sections:
            run("loader", lambda: section_loader(cfg, device, report, figures, folder, files))
        if "ddp" in args.sections:
            run("ddp", lambda: section_ddp(cfg, device, report, figures, folder, files, work))

    total = time.perf_counter() - t_start
    report["total_s"] = round(total, 1)
    report["figures"] = {k: round(float(v), 4) for k, v in figures.items()}
    print("\n== All figures")
    print(table(["figure", "value"], [[k, f"{v:,.3f}"] for k, v in report["figures"].items()]))
    print(f"   {ANCHOR}")
    print("   seconds per section: " + ", ".join(f"{k} {v}" for k, v in report["sections_s"].items())
          + f"; total {total:.1f} s")
    if report["errors"]:
        print(f"!! failed sections: {', '.join(report['errors'])}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"   JSON: {args.json}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
