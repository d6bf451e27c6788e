"""A bounded load test of `visionflow serve` on loopback, against in-process prediction, for
each inference runtime side by side (`--runtimes torch onnx`, the default: PyTorch eager and
onnxruntime on the model's parity-proven ONNX export; see visionflow.deploy.runtime).

For each runtime R, one after the other in the same run, it starts `visionflow serve --model
MODEL --runtime R` (a subprocess in its own process group, on a free port), waits for /health,
loads the same MODEL with the same runtime in this process through the loader the server uses
(`visionflow.deploy.predict.load_batch_model`), and then:

1. warm-up: every test image once, served and in process (not counted);
2. paired: `--sequential` rounds of one served request (raw body, image/png or image/jpeg) and
   then one in-process `predict([image])` of the same image, one at a time. Alternating
   puts both under the same machine load, so served p50 / in-process p50 is the serving
   overhead (HTTP, decoding, JSON) even on a busy machine;
3. load: `--clients` threads, each with its own keep-alive connection, POST one image at a
   time for `--duration` seconds;
4. the server is stopped: SIGTERM to its group, SIGKILL if it lingers (always, in a finally).

Reported: latency p50/p95/p99 of the 200s under load and sequential, throughput under load
(req/s = images/s, one image a request), answers by status (503 from --max-concurrency apart
from real errors; a 503 is retried at once, not after Retry-After, so a limit below --clients
shows up as many 503s), the server's RSS (VmRSS summed over its process group, from /proc) at
start, before and after the load, and its peak (VmHWM), the in-process p50/p95/p99 and the
overhead = served p50 / in-process p50 (sequential, and under load). Printed as a table and
written to --out as JSON; the exit code is 1 if any request failed other than with a 503.
The runtimes are printed side by side, with onnxruntime's speed-up over torch (p50 latency
ratios torch / onnx, throughput onnx / torch). A runtime the model cannot use (onnx without an
export) is reported as unavailable, with the reason, and skipped.

    .venv/bin/python benchmarks/serve_load.py --model models/classify --clients 4 --duration 15 --out /tmp/serve.json
    .venv/bin/python benchmarks/serve_load.py --model models:/visionflow-shapes-classifier@candidate \\
        --tracking-uri sqlite:///mlflow.db --images data/shapes/images --n-images 32

Latency is measured by the client on the same machine: on a small box the clients and the
server share the cores, so the served figures include that contention.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
REQUEST_TIMEOUT_S = 120


# --- test images ---

def load_images(folder: str | None, n: int, size: int) -> list[tuple[bytes, str]]:
    """(encoded bytes, Content-Type) of up to `n` PNG/JPEG files of `folder` (sorted), or of
    `n` synthetic shape images (visionflow.datasets.synth) encoded as PNG."""
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
        if not files:
            sys.exit(f"error: {folder}: no .png/.jpg/.jpeg files")
        return [(p.read_bytes(), IMAGE_SUFFIXES[p.suffix.lower()]) for p in files]
    import io

    from visionflow.datasets.synth import render_image

    out = []
    for i in range(n):
        buf = io.BytesIO()
        render_image(seed=123, index=i, size=size)[0].save(buf, format="PNG")
        out.append((buf.getvalue(), "image/png"))
    return out


def decode(blob: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB"))  # (H, W, 3) uint8, as the server decodes it


# --- the server process ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, log_path: Path, runtime: str) -> subprocess.Popen:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # intra-op threads in the server (torch and onnxruntime)
    cmd = [sys.executable, "-m", "visionflow.cli", "serve", "--model", args.model, "--port", str(port),
           "--max-concurrency", str(args.max_concurrency), "--runtime", runtime]
    if args.model.startswith("models:/"):
        cmd += ["--tracking-uri", args.tracking_uri]
    with open(log_path, "w") as log:  # a file: a pipe nobody reads would block the server
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for_health(proc: subprocess.Popen, port: int, timeout: float, log_path: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            sys.exit(f"error: the server exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return time.monotonic() - start
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.3)
    stop_group(proc)
    sys.exit(f"error: no /health answer within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn stops gracefully), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so it stops counting as a member
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def group_memory_mb(pgid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) in MB, summed over the processes of group `pgid` (the
    server and any children), from /proc: no psutil needed."""
    rss = hwm = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # pgrp is the 3rd field after the ")" that ends the command name
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            fields = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        rss += int(fields.get("VmRSS", "0 kB").split()[0])
        hwm += int(fields.get("VmHWM", "0 kB").split()[0])
    return {"rss_mb": round(rss / 1024, 1), "peak_rss_mb": round(hwm / 1024, 1)}


# --- clients ---

def post(conn: http.client.HTTPConnection, body: bytes, content_type: str) -> tuple[int, float, bytes]:
    start = time.perf_counter()
    conn.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, time.perf_counter() - start, data


def answered_one(data: bytes) -> bool:
    try:
        return len(json.loads(data)["predictions"]) == 1
    except (ValueError, KeyError, TypeError):
        return False


def paired(port: int, model, images: list[tuple[bytes, str]], arrays: list[np.ndarray],
           n: int) -> tuple[list[float], list[float]]:
    """`n` rounds of one served request and one in-process predict() of the same image, one at
    a time: the two see the same machine load, so their ratio is the serving overhead. The
    order alternates, so neither always runs while the other's idle OpenMP workers still spin.
    predict() runs in a worker thread, as `visionflow serve` runs it: here, torch in the main
    thread was up to 1.5x slower with 2 intra-op threads on a busy 2-core machine."""
    pool = ThreadPoolExecutor(max_workers=1)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    served, local = [], []

    def serve_one(i: int) -> None:
        status, seconds, data = post(conn, *images[i % len(images)])
        if status != 200 or not answered_one(data):
            sys.exit(f"error: request {i} got {status}: {data[:300]!r}")
        served.append(seconds)

    def predict_one(i: int) -> None:
        start = time.perf_counter()
        pool.submit(model.predict, [arrays[i % len(arrays)]]).result()
        local.append(time.perf_counter() - start)

    for i in range(n):
        for step in ((serve_one, predict_one) if i % 2 == 0 else (predict_one, serve_one)):
            step(i)
    conn.close()
    pool.shutdown()
    return served, local


def load(port: int, images: list[tuple[bytes, str]], clients: int, duration: float) -> dict:
    """`clients` threads POSTing for `duration` s; latencies of the 200s and counts by outcome."""
    latencies: list[float] = []
    outcomes: Counter = Counter()
    lock = threading.Lock()
    start_barrier = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        mine, counts, i = [], Counter(), k
        start_barrier.wait()
        while time.perf_counter() < deadline[0]:
            try:
                status, seconds, data = post(conn, *images[i % len(images)])
            except (OSError, http.client.HTTPException) as exc:
                counts[f"connection error ({type(exc).__name__})"] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
                continue
            i += 1
            if status == 200 and answered_one(data):
                mine.append(seconds)
                counts["200"] += 1
            elif status == 200:
                counts["200 without one prediction"] += 1
            else:
                counts[str(status)] += 1
        conn.close()
        with lock:
            latencies.extend(mine)
            outcomes.update(counts)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + duration
    start_barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(duration + REQUEST_TIMEOUT_S + 10)
    return {"latencies": latencies, "outcomes": dict(outcomes), "wall_s": time.perf_counter() - t0}


# --- report ---

def percentiles_ms(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "n": 0}
    p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2),
            "n": len(latencies)}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def print_table(result: dict) -> None:
    """One column per runtime, side by side, then the ratios."""
    runs = result["runtimes"]
    for name, r in runs.items():
        print(f"--runtime {name}: " + (f"unavailable: {r['unavailable']}" if "unavailable" in r else
                                       f"{r['runtime']['name']} ({r['runtime']['reason']})"))
    tables = {name: dict(table_rows(r)) for name, r in runs.items() if "unavailable" not in r}
    if not tables:
        return
    keys = list(dict.fromkeys(k for rows in tables.values() for k in rows))
    width = max(len(k) for k in keys)
    cols = {name: max(len(name), *(len(v) for v in rows.values())) for name, rows in tables.items()}
    print(f"{'':<{width}}  " + "  ".join(f"{name:<{cols[name]}}" for name in tables))
    for k in keys:
        print(f"{k:<{width}}  " + "  ".join(f"{rows.get(k, '-'):<{cols[name]}}" for name, rows in tables.items()))
    if result["ratios"]:
        r = result["ratios"]
        print(f"--- onnxruntime against torch (x faster): in process p50 {r['in_process_p50']}x, served one at a "
              f"time p50 {r['served_sequential_p50']}x, served under load p50 {r['served_under_load_p50']}x, "
              f"throughput {r['throughput']}x")


def table_rows(r: dict) -> list[tuple[str, str]]:
    s, q, ip, mem = r["served_under_load"], r["served_sequential"], r["in_process"], r["server_memory"]
    return [
        ("model", r["model"]),
        ("images", f"{r['images']['count']} ({r['images']['source']})"),
        ("clients / duration", f"{r['clients']} / {r['duration_s']} s (server --max-concurrency "
                               f"{r['max_concurrency']}, torch threads {r['torch_threads']})"),
        ("server start-up to /health", f"{r['startup_s']:.1f} s"),
        ("served under load p50/p95/p99", f"{s['p50_ms']} / {s['p95_ms']} / {s['p99_ms']} ms ({s['n']} requests)"),
        ("throughput", f"{r['throughput']['req_per_s']} req/s = {r['throughput']['images_per_s']} images/s"),
        ("answers", ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items())) or "none"),
        ("503 busy / real errors", f"{r['busy_503']} / {r['errors']}"),
        ("served sequential p50/p95/p99", f"{q['p50_ms']} / {q['p95_ms']} / {q['p99_ms']} ms ({q['n']} requests)"),
        ("in-process predict p50/p95/p99", f"{ip['p50_ms']} / {ip['p95_ms']} / {ip['p99_ms']} ms ({ip['n']} calls)"),
        ("overhead: served p50 / in-process p50", f"{r['overhead_under_load']}x under load, "
                                                  f"{r['overhead_sequential']}x sequential"),
        ("server RSS start, before -> after load (peak)",
         f"{mem['at_start']['rss_mb']}, {mem['before']['rss_mb']} -> {mem['after']['rss_mb']} MB "
         f"({mem['after']['peak_rss_mb']} MB)"),
    ]


def run(args) -> dict:
    """Every runtime of --runtimes, one after the other, on the same images: {"runtimes":
    {runtime: one_runtime's result, or {"unavailable": why}}, "ratios": torch / onnx}."""
    import torch

    from visionflow.core.errors import UserError
    from visionflow.deploy.predict import load_batch_model

    if args.threads:
        torch.set_num_threads(args.threads)  # the same as the server's

    images = load_images(args.images, args.n_images, args.image_size)
    arrays = [decode(blob) for blob, _ in images]
    out: dict = {"runtimes": {}}
    for runtime in args.runtimes:
        try:  # in process first: a runtime the model cannot use is skipped before a server starts
            local_model = load_batch_model(args.model, lambda: args.tracking_uri, runtime)
        except UserError as exc:
            out["runtimes"][runtime] = {"unavailable": str(exc)}
            continue
        out["runtimes"][runtime] = one_runtime(args, runtime, local_model, images, arrays)
    out["ratios"] = ratios(out["runtimes"])
    return out


def one_runtime(args, runtime: str, local_model, images, arrays) -> dict:
    """The server started with --runtime `runtime`, and the same runtime in process."""
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="serve-load-")) / "server.log"
    proc = start_server(args, port, log_path, runtime)
    try:
        startup = wait_for_health(proc, port, args.startup_timeout, log_path)
        at_start = group_memory_mb(proc.pid)
        # In process, through the loader `visionflow serve` uses (same model, same code path).
        paired(port, local_model, images, arrays, len(images))  # warm-up: first-call costs out of the figures
        seq, local = paired(port, local_model, images, arrays, args.sequential)
        before = group_memory_mb(proc.pid)
        loaded = load(port, images, args.clients, args.duration)
        after = group_memory_mb(proc.pid)
    finally:
        stop_group(proc)
    result = summarise(args, images, arrays, startup, seq, local, loaded,
                       {"at_start": at_start, "before": before, "after": after})
    return {**result, "runtime": local_model.runtime}


def ratios(runs: dict) -> dict:
    """torch / onnx: latency p50s (how many times faster onnxruntime answers) and throughput
    onnx / torch; empty unless both ran."""
    t, o = runs.get("torch", {}), runs.get("onnx", {})
    if "served_under_load" not in t or "served_under_load" not in o:
        return {}
    return {"in_process_p50": ratio(t["in_process"]["p50_ms"], o["in_process"]["p50_ms"]),
            "served_sequential_p50": ratio(t["served_sequential"]["p50_ms"], o["served_sequential"]["p50_ms"]),
            "served_under_load_p50": ratio(t["served_under_load"]["p50_ms"], o["served_under_load"]["p50_ms"]),
            "throughput": ratio(o["throughput"]["req_per_s"], t["throughput"]["req_per_s"])}


def summarise(args, images, arrays, startup: float, seq: list[float], local: list[float], loaded: dict,
              memory: dict) -> dict:
    import torch

    ok, outcomes = loaded["latencies"], loaded["outcomes"]
    served, seq_stats, local_stats = percentiles_ms(ok), percentiles_ms(seq), percentiles_ms(local)
    rate = round(len(ok) / loaded["wall_s"], 2)
    return {
        "model": args.model, "clients": args.clients, "duration_s": args.duration,
        "max_concurrency": args.max_concurrency, "torch_threads": torch.get_num_threads(),
        "images": {"count": len(images), "source": args.images or f"synthetic {args.image_size} px PNG",
                   "sizes": sorted({f"{a.shape[1]}x{a.shape[0]}" for a in arrays})},
        "startup_s": round(startup, 2),
        "served_under_load": served, "served_sequential": seq_stats, "in_process": local_stats,
        "throughput": {"req_per_s": rate, "images_per_s": rate, "wall_s": round(loaded["wall_s"], 2)},
        "outcomes": outcomes, "busy_503": outcomes.get("503", 0),
        "errors": sum(v for k, v in outcomes.items() if k not in ("200", "503")),
        "overhead_under_load": ratio(served["p50_ms"], local_stats["p50_ms"]),
        "overhead_sequential": ratio(seq_stats["p50_ms"], local_stats["p50_ms"]),
        "server_memory": memory,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "platform": platform.platform()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a local model folder (models/classify) or models:/NAME@ALIAS")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store for models:/ URIs (default: "
                    "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current folder)")
    ap.add_argument("--images", default=None, help="folder of PNG/JPEG test images (default: synthetic shapes)")
    ap.add_argument("--n-images", type=int, default=16, help="how many test images (default 16)")
    ap.add_argument("--image-size", type=int, default=96, help="size of the synthetic images (default 96)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load (default 15)")
    ap.add_argument("--max-concurrency", type=int, default=None, help="server's limit (default: --clients)")
    ap.add_argument("--sequential", type=int, default=100, help="rounds of one served request then one in-process "
                    "predict, one at a time (default 100)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of the server (OMP_NUM_THREADS) "
                    "and of the in-process model, torch's and onnxruntime's (default: torch's default, the cores)")
    ap.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx", "auto"],
                    help="the `serve --runtime` values to measure, one after the other (default: torch onnx; "
                         "onnx is skipped, and says why, for a model without a usable ONNX export)")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.clients < 1 or args.duration <= 0 or args.n_images < 1:
        ap.error("--clients and --n-images must be >= 1 and --duration > 0")
    args.max_concurrency = args.max_concurrency or args.clients
    if args.model.startswith("models:/"):
        args.tracking_uri = (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or f"sqlite:///{Path('mlflow.db').resolve()}")
    result = run(args)
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(r.get("errors", 0) == 0 for r in result["runtimes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
