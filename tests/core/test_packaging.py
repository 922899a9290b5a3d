"""What the registry and ComfyUI-Manager read from pyproject.toml, and what users install."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_tested_comfyui_range_is_declared():
    spec = PYPROJECT["tool"]["comfy"]["requires-comfyui"]
    assert ">=0.3.75" in spec and "0.33.0" in spec, spec
    run_tests = (ROOT / "scripts" / "run_tests.sh").read_text(encoding="utf-8")
    assert re.search(r'DRIFTSCOPE_VERSIONS:-0\.33\.0 0\.3\.75', run_tests), "make test must run both versions"


def test_runtime_dependencies_leave_torch_to_comfyui():
    deps = PYPROJECT["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0] for d in deps}
    assert names == {"torch", "safetensors", "numpy", "pillow", "einops", "comfyui-frontend-package"}
    assert "torch" in deps, "torch must never be pinned for users"
    frontend = next(d for d in deps if d.startswith("comfyui-frontend-package"))
    assert ">=" in frontend, "the frontend gets a lower bound"


def test_registry_name_and_entry_points():
    assert "comfyui" not in PYPROJECT["project"]["name"].lower()
    init = (ROOT / "__init__.py").read_text(encoding="utf-8")
    assert 'WEB_DIRECTORY = "./web"' in init and "async def comfy_entrypoint" in init
