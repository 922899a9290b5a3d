"""Nothing unsafe loads: no pickle, no torch.load without weights_only=True, no
numpy.load(allow_pickle=True) in the pack's Python code (core, nodes, scripts, benchmarks, tests).

The scan reads each file's syntax tree, so comments and strings do not count and aliases
(`import pickle as p`, `from torch import load`) do.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("driftscope_core", "nodes", "scripts", "benchmarks", "tests")
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


class _Scanner(ast.NodeVisitor):
    """Collects unsafe imports and calls of one module, resolving its import aliases."""

    def __init__(self):
        self.modules: dict[str, str] = {}  # local name -> module ("np" -> "numpy")
        self.names: dict[str, str] = {}  # local name -> "module.attr" ("load" -> "torch.load")
        self.found: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self.modules[alias.asname or alias.name.split(".")[0]] = alias.name
            if alias.name.split(".")[0] in PICKLING_MODULES:
                self.found.append((node.lineno, f"import {alias.name}"))

    def visit_ImportFrom(self, node: ast.ImportFrom):
        module = node.module or ""
        for alias in node.names:
            self.names[alias.asname or alias.name] = f"{module}.{alias.name}"
        if module.split(".")[0] in PICKLING_MODULES:
            self.found.append((node.lineno, f"from {module} import ..."))

    def _target(self, func: ast.AST) -> str:
        """The dotted name a call goes to, with aliases resolved ("numpy.load")."""
        if isinstance(func, ast.Name):
            return self.names.get(func.id, self.modules.get(func.id, func.id))
        if isinstance(func, ast.Attribute):
            return f"{self._target(func.value)}.{func.attr}"
        return ""

    def visit_Call(self, node: ast.Call):
        target = self._target(node.func)
        root, _, attr = target.partition(".")
        if target == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            self.found.append((node.lineno, "torch.load without weights_only=True"))
        elif target in ("numpy.load", "np.load") and _is_true(_keyword(node, "allow_pickle")):
            self.found.append((node.lineno, "numpy.load(allow_pickle=True)"))
        elif root in PICKLING_MODULES and attr.startswith(("load", "Unpickler", "open")):
            self.found.append((node.lineno, target))
        elif target.endswith(".read_pickle"):
            self.found.append((node.lineno, target))
        self.generic_visit(node)


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    scanner = _Scanner()
    scanner.visit(ast.parse(source))
    return scanner.found


def python_files() -> list[Path]:
    files = [p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")]
    return sorted(p for p in files + list(ROOT.glob("*.py")) if "__pycache__" not in p.parts)


def findings(paths) -> dict[str, list]:
    out = {}
    for path in paths:
        found = unsafe_loads(path.read_text(encoding="utf-8"))
        if found:
            out[path.relative_to(ROOT).as_posix()] = found
    return out


def test_the_pack_loads_nothing_unsafe():
    files = python_files()
    assert len(files) > 50  # the scan sees the whole pack
    assert findings(files) == {}


@pytest.mark.parametrize("source", [
    "import pickle",
    "import pickle as p\np.loads(b'')",
    "from pickle import load",
    "import dill",
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "import torch as T\nT.load('x.pt', map_location='cpu')",
    "from torch import load\nload('x.pt')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import numpy\nnumpy.load('x.npy', allow_pickle=True)",
    "import pandas as pd\npd.read_pickle('x')",
])
def test_the_scan_finds_unsafe_loading(source):
    assert unsafe_loads(source)


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load('x.pt', weights_only=True)",
    "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load('x.npy')\nnp.load('y.npy', allow_pickle=False)",
    "from safetensors.torch import load_file\nload_file('x.safetensors')",
    "import json\njson.load(open('x.json'))",
    "# import pickle\ntext = 'torch.load(path)'",
])
def test_the_scan_allows_safe_loading(source):
    assert unsafe_loads(source) == []
