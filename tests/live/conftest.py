"""Fixtures for tests that run a real ComfyUI server (see scripts/comfy_server.py).

ComfyUI is expected at <repo>/.comfyui/ComfyUI (made by scripts/setup.sh). When it
is missing the live tests are skipped, except in CI (env var CI set), where a
missing ComfyUI is an error.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = REPO_ROOT / ".comfyui" / "ComfyUI"


def _load_harness():
    # scripts/ is a folder of standalone scripts, not an importable package, and
    # the tests must not edit sys.path: load the harness file by its path. It is
    # registered in sys.modules so that its classes pickle and compare normally.
    name = "comfy_server"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / "comfy_server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


comfy_server_harness = _load_harness()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def comfy_server_module():
    """The scripts/comfy_server.py module (ComfyServer, PromptFailed, ...)."""
    return comfy_server_harness


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    """The ComfyUI checkout the live tests run; skips (fails in CI) if it is missing."""
    if not (COMFY_DIR / "main.py").is_file():
        reason = f"ComfyUI not found at {COMFY_DIR}; run scripts/setup.sh to install it"
        if _in_ci():
            pytest.fail(reason + " (CI is set, so this is an error)")
        pytest.skip(reason)
    return COMFY_DIR


@pytest.fixture
def comfy_server_factory(comfy_dir):
    """make(base_directory, **kwargs) -> a started ComfyServer; all are stopped at teardown."""
    started = []

    def make(base_directory, **kwargs):
        server = comfy_server_harness.ComfyServer(comfy_dir, base_directory=base_directory, **kwargs)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def comfy_server(comfy_dir, tmp_path_factory):
    """One server for the whole session, with its own temporary base directory.

    Tests share it: give outputs unique filename prefixes and do not stop it.
    """
    base = tmp_path_factory.mktemp("comfy-base")
    with comfy_server_harness.ComfyServer(comfy_dir, base_directory=base) as server:
        yield server


def _load_script(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def demo_script():
    """scripts/demo.py: demo_overrides() and ensure_models()."""
    return _load_script("demo")


@pytest.fixture(scope="session")
def demo_models_dir(comfy_dir, demo_script) -> Path:
    """The tiny demo models (generated once, reused across runs: they are stamped)."""
    models = REPO_ROOT / ".demo" / "comfy" / "models"
    demo_script.ensure_models(models)
    return models


@pytest.fixture(scope="session")
def demo_server(comfy_dir, demo_models_dir, tmp_path_factory):
    """A server whose models folder holds the demo checkpoints and LoRA."""
    base = tmp_path_factory.mktemp("comfy-demo")
    (base / "models").symlink_to(demo_models_dir, target_is_directory=True)
    with comfy_server_harness.ComfyServer(comfy_dir, base_directory=base) as server:
        yield server
