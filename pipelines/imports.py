"""Which project modules a piece of code imports, read from the source (nothing is imported).

Used wherever the project must list the code something runs: the code shipped with the registry's
pyfunc model, what the bento includes, and the `deps` of each DVC stage (a test compares dvc.yaml
with it). Every `import` and `from ... import` counts, at module level and inside functions (the
project imports heavy libraries lazily), and so does the `__init__.py` of every package on the way.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

from pipelines.environment import PROJECT_ROOT


def module_file(module: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The file of a project module (`a.b` -> a/b.py or a/b/__init__.py), None when it is not one."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(nodes: Iterable[ast.AST]) -> set[str]:
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            # `from package import module` imports a submodule when one has that name.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _with_packages(module: str, root: Path) -> set[Path]:
    """The module's file and the __init__.py of each package above it."""
    parts = module.split(".")
    files = {module_file(".".join(parts[:i]), root) for i in range(1, len(parts) + 1)}
    return {f for f in files if f is not None}


def _closure(start: set[str], root: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [f for m in start for f in _with_packages(m, root)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        todo += [f for m in _imported_modules(ast.walk(tree)) for f in _with_packages(m, root)]
    return seen


def project_files(module: str, function: str | None = None, root: Path = PROJECT_ROOT) -> list[str]:
    """Paths (relative to `root`, sorted) of the project modules that `module` imports, itself
    included, transitively. With `function`, only that function's own imports and the module-level
    ones of `module` count (a CLI module holds several verbs, each importing its own stage)."""
    path = module_file(module, root)
    if path is None:
        raise ValueError(f"{module}: not a module of {root}")
    if function is None:
        files = _closure({module}, root)
    else:
        tree = ast.parse(path.read_text(), filename=str(path))
        funcs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function]
        if not funcs:
            raise ValueError(f"{module}: no function {function!r}")
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        files = _closure(_imported_modules([*top, *ast.walk(funcs[0])]), root) | _with_packages(module, root)
    return sorted(p.relative_to(root).as_posix() for p in files)
