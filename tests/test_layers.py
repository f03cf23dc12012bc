"""The package layers of docs/architecture.md: no module imports from a layer above its own."""

import ast
from pathlib import Path

import mft

# What each package of mft may import from (besides itself). Entry points sit on top.
ALLOWED = {
    "utils": set(),
    "kernels": {"utils"},
    "quant": {"utils", "kernels"},
    "model": {"utils", "kernels"},
    "data": {"utils"},
    "peft": {"utils", "kernels", "quant", "model"},
    "checkpoint": {"utils", "kernels", "quant", "model", "peft"},
    "build": {"utils", "kernels", "quant", "model", "peft", "checkpoint"},
    "config": {"utils", "model", "data"},
    "compose": {"utils"},
    "generate": {"utils", "kernels", "quant", "model", "peft", "checkpoint", "build", "data", "config", "compose"},
    "train": {"utils", "kernels", "quant", "model", "peft", "checkpoint", "build", "data", "config", "compose"},
    "report": {"utils", "train"},  # reads what mft/train/metrics.py writes; no torch
    "cli": {"utils", "kernels", "quant", "model", "peft", "checkpoint", "build", "data", "config", "compose",
            "generate"},
}
ENTRY_POINTS = {"train/cli.py", "generate/cli.py", "data/validate.py", "cli"}  # may compose configs


def _layer(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _mft_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mft" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_no_module_imports_from_a_higher_layer():
    root = Path(mft.__file__).parent
    wrong = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        layer = _layer(path, root)
        if layer == "__init__" or rel in ENTRY_POINTS or rel.split("/")[0] in ENTRY_POINTS:
            continue
        for lineno, target in _mft_imports(path):
            if target != layer and target not in ALLOWED[layer]:
                wrong.append(f"mft/{rel}:{lineno} ({layer}) imports mft.{target}")
    assert not wrong, "\n".join(wrong)


def test_every_package_has_a_layer():
    root = Path(mft.__file__).parent
    packages = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"conf"}
    modules = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    assert packages | modules <= set(ALLOWED), sorted((packages | modules) - set(ALLOWED))
