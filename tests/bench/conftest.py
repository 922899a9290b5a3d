"""Benchmark smoke tests: the benchmark's own modules with ComfyUI in process.

benchmarks/environment.py does what tests/nodes/conftest.py does (ComfyUI on sys.path, CPU and
PyTorch attention, the pack imported as "DriftScope", scripts/demo_models.py) and reuses the
modules if that conftest already loaded them. It runs in a fixture, not at collection, so a
whole-suite session keeps a single copy of the pack.
"""
import os
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # the benchmark's modules import each other by name


@pytest.fixture(scope="session")
def bench_env():
    import environment

    try:
        environment.comfy_dir()
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("ComfyUI is not set up (run scripts/setup.sh)")
    return environment.load(threads=None)  # keep the session's thread count
