"""What every task's evaluate report is written with: CSV plots, the predictions file and the
choice of grid images (the task modules decide what goes in them)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from visionflow.core.files import atomic_path, write_with


def grid_pick(n: int, k: int) -> set[int]:
    """Indices of `k` test images spread evenly over `n` (the evaluate grid figure)."""
    return set(np.linspace(0, n - 1, num=min(k, n), dtype=int).tolist()) if k and n else set()


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
