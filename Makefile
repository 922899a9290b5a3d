# DriftScope developer commands. `make demo` and `make test` set everything up on a fresh machine.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench bench-quick clean

setup:
	bash scripts/setup.sh --browser

## The main job on the embedded tiny demo: planted drift found through a real ComfyUI server.
demo: setup
	$(PY) scripts/demo.py

## The whole test suite: core (plain torch), nodes (in-process ComfyUI), live server and browser.
## pytest's exit code 5 (no tests collected) fails like any other error.
test: setup
	$(PY) -m pytest -q --timeout=1200 --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

## Core and in-process node tests only (no server, no browser).
test-fast: setup
	$(PY) -m pytest -q tests/core tests/nodes $(PYTEST_ARGS)

## Accuracy and cost of every search mode against exhaustive ground truth (benchmarks/README.md).
bench: setup
	$(PY) benchmarks/run.py --medium

bench-quick: setup
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf .demo
