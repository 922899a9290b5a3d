"""Tier 2: the nodes and the host glue with a real, in-process ComfyUI (tiny models).

benchmarks/environment.py (on pytest's pythonpath) puts ComfyUI's folder on sys.path, tells it
to use the CPU and PyTorch attention before comfy.model_management is imported, and imports the
pack under the package name ComfyUI gives it ("DriftScope"), plus scripts/demo_models.py. It runs
at collection, because the test modules import comfy at their top.
"""
import os
import sys
from pathlib import Path

import environment
import pytest

try:
    environment.comfy_dir()
except FileNotFoundError as missing:
    if os.environ.get("CI"):
        raise RuntimeError(f"{missing}: CI needs ComfyUI") from missing
    pytest.skip("ComfyUI is not set up (run scripts/setup.sh)", allow_module_level=True)

ENV = environment.load(threads=None)  # keep torch's thread count for the whole session
sys.path.insert(0, str(Path(__file__).parent))  # audit_helpers, shared by the test modules here


@pytest.fixture(scope="session")
def demo_models():
    return ENV.demo_models


@pytest.fixture(scope="session")
def pack():
    return ENV.pack
