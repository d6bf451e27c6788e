"""Module boundaries the design depends on (STYLE.md): one module per external service."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "visionflow"

OWNERS = {
    "mlflow": {"integrations/mlflow.py"},
    "fiftyone": {"integrations/fiftyone.py"},
    "prefect": {"integrations/prefect.py"},  # besides flows/
    "dvc": set(),  # dvc runs as a command (dvc.yaml calls `visionflow stage`); integrations/dvc.py writes its file
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_each_service_is_imported_by_one_module_only():
    seen: dict[str, set[str]] = {lib: set() for lib in OWNERS}
    for path in SRC.rglob("*.py"):
        for lib in OWNERS:
            if lib in _imports(path):
                seen[lib].add(path.relative_to(SRC).as_posix())
    for lib, owners in OWNERS.items():
        assert seen[lib] <= owners, f"{lib} is imported by {sorted(seen[lib] - owners)}; only {owners} may"


def test_stage_modules_do_not_import_orchestrators():
    for path in (SRC / "stages").glob("*.py"):
        assert not _imports(path) & {"prefect", "dvc"}, path.name
