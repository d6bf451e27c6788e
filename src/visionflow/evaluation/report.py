"""What every task's evaluate report is written with: CSV plots, the predictions file and the
choice of grid images (the task modules decide what goes in them)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from visionflow.core.files import atomic_path, read_json, write_json, write_with

# Strings that are metrics-file columns; any other string (a description) is a detail.
_SCALAR_STRINGS = ("task", "primary_metric")


def grid_pick(n: int, k: int) -> set[int]:
    """Indices of `k` test images spread evenly over `n` (the evaluate grid figure)."""
    return set(np.linspace(0, n - 1, num=min(k, n), dtype=int).tolist()) if k and n else set()


def write_evaluation(paths, metrics: dict[str, Any]) -> None:
    """The evaluate stage's numbers in two files: metrics/<task>/evaluate.json holds the scalars
    only (the numbers, `task` and `primary_metric`), so `dvc metrics show/diff` and `dvc exp show`
    give one narrow column each; reports/<task>/evaluate_details.json holds the rest under the
    same keys (per-class tables, confusion matrices, the evaluator's settings, class lists)."""
    flat = {k: v for k, v in metrics.items()
            if v is None or isinstance(v, (bool, int, float)) or (k in _SCALAR_STRINGS and isinstance(v, str))}
    write_json(paths.eval_metrics, flat)
    write_json(paths.eval_details, {"task": metrics.get("task"), **{k: v for k, v in metrics.items() if k not in flat}})


def read_evaluation(paths) -> dict[str, Any]:
    """evaluate.json with its details merged back in (an evaluation written before the split:
    evaluate.json alone)."""
    details = read_json(paths.eval_details) if paths.eval_details.exists() else {}
    return {**details, **read_json(paths.eval_metrics)}


def write_csv(path: Path, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    def _w(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)

    write_with(path, _w)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def fmt(v: Optional[float]) -> str:
    """A CSV cell: 6 decimals, empty where the value is undefined."""
    return "" if v is None else f"{v:.6f}"
