"""An in-process ComfyUI with the DriftScope pack loaded, for the benchmark (no server).

ComfyUI is not a package: its folder goes on sys.path, and on a machine without CUDA it must be
told to use the CPU (and PyTorch attention, much faster on CPU) before comfy.model_management is
imported. The pack is imported under the package name ComfyUI gives it ("DriftScope"), so its
relative imports work as inside ComfyUI; scripts/demo_models.py comes along for the tiny models.
If a test session already loaded either module, that copy is reused (one copy of every class).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFY = ROOT / ".comfyui" / "ComfyUI"  # where scripts/setup.sh puts it
COMFY_ENV = "DRIFTSCOPE_COMFYUI"  # or point this variable at another ComfyUI folder


@dataclass(frozen=True)
class Environment:
    pack: ModuleType  # the DriftScope package (driftscope_core and nodes inside)
    demo_models: ModuleType  # scripts/demo_models.py
    comfy_dir: Path
    threads: int

    @property
    def core(self) -> ModuleType:
        return self.pack.driftscope_core

    @property
    def host(self) -> ModuleType:
        return self.pack.nodes.host


def comfy_dir(explicit: str | os.PathLike | None = None) -> Path:
    path = Path(explicit or os.environ.get(COMFY_ENV) or DEFAULT_COMFY).resolve()
    if not (path / "comfy").is_dir():
        raise FileNotFoundError(
            f"no ComfyUI under {path}: run scripts/setup.sh, or pass --comfy / set {COMFY_ENV}"
        )
    return path


def _load(name: str, path: Path, package: bool = False) -> ModuleType:
    kwargs = {"submodule_search_locations": [str(path.parent)]} if package else {}
    spec = importlib.util.spec_from_file_location(name, path, **kwargs)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load(comfy: str | os.PathLike | None = None, threads: int | None = 1) -> Environment:
    """Import ComfyUI and the pack in this process. `threads` sets torch's CPU threads (None
    keeps torch's choice): one thread gives steady timings on a shared machine."""
    folder = comfy_dir(comfy)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        if not torch.cuda.is_available():
            args.cpu = True
        args.use_pytorch_cross_attention = True
    demo = sys.modules.get("demo_models") or _load("demo_models", ROOT / "scripts" / "demo_models.py")
    pack = sys.modules.get("DriftScope") or _load("DriftScope", ROOT / "__init__.py", package=True)
    importlib.import_module("DriftScope.nodes")  # what the pack's comfy_entrypoint imports
    importlib.import_module("DriftScope.nodes.audit")
    return Environment(pack, demo, folder, torch.get_num_threads())
