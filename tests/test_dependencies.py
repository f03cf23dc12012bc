"""Every third-party module mft imports is declared in pyproject.toml.

An import that runs when an entry point or `import mft` loads (at a module's top level, reachable
through other top-level imports) needs a distribution in `dependencies`. An optional one (W&B,
Parquet, Triton, xformers, transformers) must be imported lazily (inside a function, or under
`except ImportError`) and declared in `dependencies` or one of the extras.
"""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"mft": REPO / "mft", "hydra_plugins": REPO / "launch" / "hydra_plugins"}  # our top-level packages
ROOTS = ["mft", "mft.train.cli", "mft.generate.cli", "mft.cli.export", "mft.cli.quantize", "mft.data.validate",
         "mft.report.cli", "hydra_plugins.mft_torchrun_launcher"]
# Import names whose distribution is not installed here to be looked up (the rest come from the environment).
KNOWN = {"xformers": "xformers", "yaml": "pyyaml", "hydra": "hydra-core", "pyarrow": "pyarrow", "wandb": "wandb",
         "triton": "triton", "transformers": "transformers", "matplotlib": "matplotlib"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


def module_file(name: str) -> Path | None:
    top, *rest = name.split(".")
    if top not in SOURCES:
        return None
    base = SOURCES[top].joinpath(*rest)
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def is_guarded(node: ast.AST, parents: dict) -> bool:
    """Inside a function, or in a `try` that catches ImportError: runs only when asked for, or may fail."""
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            return True
    return False


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(absolute module name, guarded, line) of every import in `path`; `from a import b` gives a.b too."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, is_guarded(node, parents), node.lineno) for name in names]
    return found


def eager_modules() -> set[str]:
    """Our modules that importing the entry points loads: the closure of unguarded imports."""
    seen, todo = set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # a package's __init__ runs first
        todo += [target for target, guarded, _ in imports(module_file(name)) if not guarded]
    return seen


def test_every_third_party_import_is_declared():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {requirement_name(r) for group in project["optional-dependencies"].values() for r in group}
    installed = importlib.metadata.packages_distributions()
    eager = eager_modules()
    problems = set()
    for top, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            module = ".".join((top, *path.relative_to(folder).with_suffix("").parts)).removesuffix(".__init__")
            for name, guarded, line in imports(path):
                root = name.split(".")[0]
                if root in SOURCES or root in sys.stdlib_module_names:
                    continue
                dists = {normalise(d) for d in installed.get(root, [])} or {normalise(KNOWN.get(root, root))}
                where = f"{path.relative_to(REPO)}:{line} imports {root}"
                if module in eager and not guarded and not dists & core:
                    problems.add(f"{where} when the commands load: add {min(dists)} to dependencies")
                elif not dists & (core | extras):
                    problems.add(f"{where}: declare {min(dists)} in dependencies or an extra")
    assert not problems, "\n".join(sorted(problems))
