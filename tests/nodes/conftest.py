"""Tier 2: the nodes and the host glue with a real, in-process ComfyUI (tiny models).

ComfyUI is not a package: its folder goes on sys.path, and it must be told to use the CPU
(and PyTorch attention, much faster on CPU) before comfy.model_management is imported.
The pack is imported as the package ComfyUI gives it ("DriftScope"), so its relative imports
work as they do inside ComfyUI.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = ROOT / ".comfyui" / "ComfyUI"


def _load(name: str, path: Path, package: bool = False):
    kwargs = {"submodule_search_locations": [str(path.parent)]} if package else {}
    spec = importlib.util.spec_from_file_location(name, path, **kwargs)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if not (COMFY_DIR / "main.py").exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"ComfyUI is missing at {COMFY_DIR}: run scripts/setup.sh")
    pytest.skip("ComfyUI is not set up (run scripts/setup.sh)", allow_module_level=True)

sys.path.insert(0, str(COMFY_DIR))
import torch  # noqa: E402
from comfy.cli_args import args  # noqa: E402

if not torch.cuda.is_available():
    args.cpu = True
args.use_pytorch_cross_attention = True

DEMO_MODELS = _load("demo_models", ROOT / "scripts" / "demo_models.py")
PACK = _load("DriftScope", ROOT / "__init__.py", package=True)
importlib.import_module("DriftScope.nodes")  # what comfy_entrypoint() imports


@pytest.fixture(scope="session")
def demo_models():
    return DEMO_MODELS


@pytest.fixture(scope="session")
def pack():
    return PACK
