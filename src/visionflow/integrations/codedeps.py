"""A stage's code dependencies, derived from what its code imports (never hand-listed).

`dvc.yaml` lists, for each stage, the project's source files whose change must re-run it. They
are computed here from the stage function's module and, for a task branch, the task's module,
by following `import` statements transitively through the package's own source:

- every import counts, module-level or inside a function (the lazy imports that keep the CLI
  fast still run when the stage runs); imports under `if TYPE_CHECKING:` never run and do not;
- importing `a.b.c` executes `a/__init__.py` and `a/b/__init__.py` first, so they count too;
- `from a.b import c` counts `a/b/c.py` when `c` is a module, and `a/b/__init__.py` always.

Third-party packages are not followed: they are pinned by pyproject.toml, not by dvc.yaml.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Iterable, Optional

PACKAGE = "visionflow"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/visionflow


def module_file(name: str) -> Optional[Path]:
    """The source file of a module of this package (`visionflow.tasks` -> tasks/__init__.py)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = PACKAGE_DIR.joinpath(*name.split(".")[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: all of them but the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


@functools.lru_cache(maxsize=None)
def direct_imports(name: str) -> frozenset[str]:
    """The package's modules that module `name` imports (with the packages that run on the way)."""
    path = module_file(name)
    if path is None:
        return frozenset()
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]
        for target in targets:
            for mod in _with_parents(target):
                if module_file(mod) is not None:
                    found.add(mod)
    found.discard(name)
    return frozenset(found)


def closure(roots: Iterable[str]) -> set[str]:
    """The modules that importing `roots` executes, transitively (the roots included)."""
    seen: set[str] = set()
    todo = [m for r in roots for m in _with_parents(r) if module_file(m) is not None]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(direct_imports(mod) - seen)
    return seen


def code_files(roots: Iterable[str]) -> list[str]:
    """The source files of `closure(roots)` as dvc.yaml names them (`src/visionflow/...`), sorted."""
    files = {module_file(m) for m in closure(roots)}
    return sorted(f"src/{f.relative_to(PACKAGE_DIR.parent).as_posix()}" for f in files if f is not None)
