"""Issue 12's five ratios in one run, and one table of them against their goals.

Runs each of the five side-by-side benchmarks in a process of its own (contention_bench.py needs
a fresh one: libgomp reads its environment once), each writing its JSON, then prints one table:

  1  loader_bench.py         training loader / raw JPEG decode per core, 640 px photos,
                             `cache: none` and `ram`, 0 and 1 workers, uint8 and float32 batches
                             (goal >= 0.8, against Pillow's decode and against OpenCV's)
  2  train_step_bench.py     the engine's training step / a torchvision-reference loop
                             (classify, segment, detect; goal >= 1.0)
  3  runtime_bench.py        onnxruntime / PyTorch eager inference, classifier and segmenter,
                             batch 1 and 8 (goal >= 2x)
  4  feature_cache_bench.py  feature-extract epoch without / with cached features (goal >= 5x)
  5  contention_bench.py     epoch with a CPU-bound competitor / idle, as shipped (goal <= 2.5x)

Every figure is a ratio measured side by side in its own run; this script adds no timing of its
own beyond each benchmark's wall time. This machine's speed drifts by up to 1.5x between
minutes (benchmarks/README.md), so each row also carries the load average around its benchmark.
A benchmark that fails is reported and the others still run (exit status 1).

    .venv/bin/python benchmarks/ratios.py                      # about 9 minutes on 2 cores
    .venv/bin/python benchmarks/ratios.py --quick              # every benchmark at tiny sizes: under 2 minutes
    .venv/bin/python benchmarks/ratios.py --only 1 3 --out /tmp/ratios.json

Run it on an otherwise quiet machine (`make bench-ratios`). The sizes are those of the figures in
benchmarks/README.md; each script's own section says what it measures and how to vary it.
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
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from visionflow.stages.register import git_commit  # noqa: E402  (what register records on each run)

# (name, script, full-size arguments, --quick arguments)
BENCHMARKS: dict[int, tuple[str, str, list[str], list[str]]] = {
    1: ("loader", "loader_bench.py",
        ["--n", "300", "--image-size", "640", "--caches", "none", "ram", "--batches", "uint8", "float32",
         "--workers", "0", "1", "--epochs", "3"],
        ["--n", "48", "--image-size", "640", "--caches", "none", "ram", "--batches", "uint8", "float32",
         "--workers", "0", "1", "--epochs", "1", "--repeat", "1"]),
    2: ("train step", "train_step_bench.py",
        [],
        ["--size", "64", "--batch", "4", "--steps", "4", "--rounds", "2", "--warmup", "1"]),
    3: ("inference runtime", "runtime_bench.py",
        ["--tasks", "classify", "segment", "--batches", "1", "8", "--rounds", "20"],
        ["--tasks", "classify", "segment", "--batches", "1", "8", "--rounds", "3", "--warmup", "1"]),
    4: ("feature cache", "feature_cache_bench.py",
        [],
        ["--quick"]),
    5: ("contention", "contention_bench.py",
        ["--settings", "after"],
        ["--quick", "--settings", "after"]),
}


def _loader(r: dict) -> list[dict]:
    return [{"case": f"{row['image_size']} px, cache {row['cache']}, {row['workers']} worker"
                     f"{'' if row['workers'] == 1 else 's'}, {row['batches']} batches",
             "measured": row["ratio_per_core"],
             "also": f"against Pillow; {row['ratio_per_core_cv2']:.2f} against OpenCV; per CPU-second "
                     f"{row['ratio_per_cpu_s']:.2f} / {row['ratio_per_cpu_s_cv2']:.2f}; "
                     f"{row['images_per_s']:.0f} images/s",
             "goal": 0.8, "higher": True}
            for row in r["rows"]]


def _train_step(r: dict) -> list[dict]:
    return [{"case": f"{row['task']} ({row['arch']}, {row['size']} px, batch {row['batch']})",
             "measured": row["ratio"], "also": f"rounds {row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f}; "
                                               f"{row['visionflow']:.1f} / {row['reference']:.1f} images/s",
             "goal": 1.0, "higher": True}
            for row in r["rows"]]


def _runtime(r: dict) -> list[dict]:
    return [{"case": f"{task} ({t['arch']}), batch {batch}", "measured": b["ratio"],
             "also": f"{b['torch_ms']} / {b['onnx_ms']} ms, agreement {b['agreement']}", "goal": 2.0, "higher": True}
            for task, t in r["tasks"].items() for batch, b in t["batches"].items()]


def _feature_cache(r: dict) -> list[dict]:
    return [{"case": f"{r['arch']}, {r['n']} images at {r['size']} px", "measured": r["ratio"],
             "also": f"{r['epoch_without_s']} / {r['epoch_with_s']} s an epoch; "
                     f"weights differ by {r['max_weight_diff']:.1e}",
             "goal": 5.0, "higher": True}]


def _contention(r: dict) -> list[dict]:
    label = {"after": "as shipped", "before": "before the fix"}
    return [{"case": f"{label[setting]}, {r['competitors']} x {r['competitor']}, {r['n']} images at {r['size']} px",
             "measured": r[setting]["ratio"],
             "also": f"{r[setting]['contended_s']} / {r[setting]['idle_s']} s an epoch",
             "goal": 2.5, "higher": False}
            for setting in ("after", "before") if setting in r]


SUMMARIES: dict[int, Callable[[dict], list[dict]]] = {
    1: _loader, 2: _train_step, 3: _runtime, 4: _feature_cache, 5: _contention}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_one(number: int, quick: bool, work: Path) -> dict[str, Any]:
    name, script, full, small = BENCHMARKS[number]
    out = work / f"{number}-{Path(script).stem}.json"
    cmd = [sys.executable, str(HERE / script), *(small if quick else full), "--out", str(out)]
    print(f"\n=== {number}. {name}: {' '.join([script, *cmd[2:-2]])}", flush=True)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE.parent)
    entry: dict[str, Any] = {"name": name, "script": script, "args": cmd[2:-2], "rc": proc.returncode,
                             "seconds": round(time.perf_counter() - start, 1),
                             "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if proc.returncode == 0 and out.is_file():
        entry["result"] = json.loads(out.read_text())
        try:
            entry["rows"] = SUMMARIES[number](entry["result"])
        except (KeyError, TypeError) as exc:  # the script's JSON changed shape: say so, keep the others' rows
            entry["error"] = f"{script} wrote JSON without {exc} (update ratios.py's summary of it)"
    else:
        entry["error"] = f"{script} exited with status {proc.returncode}" + ("" if out.is_file() else ", no JSON")
    return entry


def verdict(row: dict) -> str:
    met = row["measured"] >= row["goal"] if row["higher"] else row["measured"] <= row["goal"]
    return "met" if met else "not met"


def print_table(entries: dict[int, dict], quick: bool) -> None:
    print("\nIssue 12's ratios, each measured side by side in its own run"
          + (" (--quick: tiny sizes, a smoke run, not figures to quote):" if quick else ":"))
    print(f"{'#':>2}  {'benchmark':18} {'case':62} {'ratio':>6}  {'goal':>7}  {'':7}  notes")
    for number, e in entries.items():
        if "rows" not in e:
            print(f"{number:>2}  {e['name']:18} {'FAILED: ' + e['error']}")
            continue
        for row in e["rows"]:
            goal = f"{'>=' if row['higher'] else '<='} {row['goal']:g}"
            print(f"{number:>2}  {e['name']:18} {row['case']:62} {row['measured']:>6.2f}  {goal:>7}  "
                  f"{verdict(row):7}  {row['also']}")
        print(f"{'':>2}  {'':18} ({e['seconds']:.0f} s; load average {e['load_avg_1m'][0]} before, "
              f"{e['load_avg_1m'][1]} after)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every benchmark at tiny sizes (a smoke run: under 2 minutes)")
    ap.add_argument("--only", type=int, nargs="+", choices=sorted(BENCHMARKS), default=sorted(BENCHMARKS),
                    metavar="N", help="the benchmarks to run, by number (1-5)")
    ap.add_argument("--out", type=Path, help="also write every benchmark's JSON and the table as one JSON file")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    commit, cpu = git_commit(HERE.parent), _cpu_name()
    print(f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, commit {commit[:12]}"
          f"{', --quick' if args.quick else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="visionflow-ratios-") as tmp:
        entries = {n: run_one(n, args.quick, Path(tmp)) for n in args.only}
    print_table(entries, args.quick)
    if args.out:
        args.out.write_text(json.dumps({
            "commit": commit, "quick": args.quick, "cpu": cpu, "cpus": os.cpu_count(),
            "started": started,
            "benchmarks": {str(n): {**e, "rows": [{**r, "verdict": verdict(r)} for r in e.get("rows", [])]}
                           for n, e in entries.items()}}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(e["rc"] == 0 and "rows" in e for e in entries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
