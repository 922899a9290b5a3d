#!/usr/bin/env bash
# The whole test suite on ComfyUI 0.33.0 (the default), then the tiers that touch ComfyUI's code
# paths (tests/nodes, tests/live) on 0.3.75 (the oldest supported, served the frontend it pins).
# tests/core never imports ComfyUI and tests/bench checks the benchmark harness, so running them
# a second time would only repeat the same code (about 5 minutes). Both runs happen even if the
# first fails; the exit status is non-zero if either failed, and pytest's exit code 5 (no tests
# collected) fails too.
#   PYTEST_ARGS="-k audit" scripts/run_tests.sh     extra pytest arguments
#   DRIFTSCOPE_VERSIONS="0.33.0" scripts/run_tests.sh   one version only
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY="$here/.venv/bin/python"
versions="${DRIFTSCOPE_VERSIONS:-0.33.0 0.3.75}"
status=0
summary=""
for version in $versions; do
  case "$version" in
    0.33.0) comfy="$here/.comfyui/ComfyUI"; frontend=""; tiers="" ;;
    0.3.75) comfy="$here/.comfyui/ComfyUI-0.3.75"
            frontend="$here/.comfyui/frontend-1.32.9/comfyui_frontend_package/static"
            tiers="tests/nodes tests/live" ;;
    *) echo "unknown ComfyUI version $version (0.33.0 or 0.3.75)" >&2; exit 2 ;;
  esac
  echo "=== ComfyUI $version: $comfy"
  start=$(date +%s)
  # shellcheck disable=SC2086
  DRIFTSCOPE_COMFYUI="$comfy" DRIFTSCOPE_FRONTEND_ROOT="$frontend" \
    "$PY" -m pytest -q --timeout=1200 --durations=15 ${PYTEST_ARGS:-${tiers}}
  rc=$?
  seconds=$(( $(date +%s) - start ))
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests on ComfyUI $version"; fi
  if [ "$rc" -ne 0 ]; then status=1; fi
  summary="$summary
ComfyUI $version: pytest exit $rc in ${seconds}s"
done
echo "=== summary$summary"
exit $status
