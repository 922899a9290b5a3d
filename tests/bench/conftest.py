"""Benchmark smoke tests: the benchmark's own modules with ComfyUI in process.

benchmarks/ is on pytest's pythonpath; benchmarks/environment.py loads ComfyUI and the pack in
process (tests/nodes/conftest.py uses it too, so a whole-suite session keeps one copy).
"""
import os

import pytest


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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's runs (benchmarks/cases.py one_thread): steady timings,
    and training weights that do not depend on the thread count."""
    import cases

    with cases.one_thread():
        yield
