# DriftScope developer commands. `make demo` and `make test` set everything up on a fresh machine.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-sdxl bench bench-quick bench-image-world clean

setup:
	bash scripts/setup.sh --browser

## The main job on the embedded tiny demo: planted drift found through a real ComfyUI server.
demo: setup
	$(PY) scripts/demo.py

## The whole test suite (core, in-process nodes, live server and browser, benchmark smoke) on
## ComfyUI 0.33.0 and again on 0.3.75; pytest's exit code 5 (no tests collected) fails too.
test: setup
	PYTEST_ARGS="$(PYTEST_ARGS)" bash scripts/run_tests.sh

## Core and in-process node tests only (no server, no browser).
test-fast: setup
	PYTEST_ARGS="tests/core tests/nodes $(PYTEST_ARGS)" DRIFTSCOPE_VERSIONS=0.33.0 bash scripts/run_tests.sh

## workflows/sdxl_lora_side_effects.json through a live server on a checkpoint the stock loader
## detects as SDXL and a kohya SDXL LoRA with a planted edit (1.9 GB, built once into .demo/sdxl),
## on both ComfyUI versions. Minutes and GBs on a CPU, so not in `make test` (README).
test-sdxl: setup
	DRIFTSCOPE_SDXL_LIVE=1 PYTEST_ARGS="tests/live/test_sdxl_workflow.py -s $(PYTEST_ARGS)" bash scripts/run_tests.sh

## Accuracy and cost of every search mode against exhaustive ground truth (benchmarks/README.md).
bench: setup
	$(PY) benchmarks/run.py --medium

bench-quick: setup
	$(PY) benchmarks/run.py --quick

## Does the reported drift show in the images? A small trained world (issue 13, benchmarks/README.md).
bench-image-world: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/image_world.py

clean:
	rm -rf .demo
