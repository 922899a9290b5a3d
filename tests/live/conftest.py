"""Fixtures for tests that run a real ComfyUI server (see scripts/comfy_server.py).

ComfyUI is expected where DRIFTSCOPE_COMFYUI points, by default <repo>/.comfyui/ComfyUI
(ComfyUI 0.33.0, made by scripts/setup.sh). When it is missing the live tests are skipped,
except in CI (env var CI set), where a missing ComfyUI is an error.
"""

import os
from pathlib import Path

import comfy_server as comfy_server_harness  # scripts/ is on pytest's pythonpath (pyproject.toml)
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = comfy_server_harness.default_comfy_dir()


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


@pytest.fixture(scope="session")
def demo_script():
    """scripts/demo.py: demo_overrides() and ensure_models()."""
    import demo

    return demo


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
