# The README's two commands are `make demo` and `make test`; both build .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_ROOT ?= $(shell if [ -d ../shared/datasets ]; then echo ../shared/datasets; else echo data; fi)
EXPERIMENT ?= annotation-granularity
PYTEST_ARGS ?=
# Passive OpenMP waiting for the demo's training: on a CPU shared with other processes, torch's spinning
# OpenMP threads made each training step 3 to 15 times slower (measured on 2 cores at load average 6).
OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test demo bench clean

setup: $(STAMP)

# pip takes torch and torchvision from the pinned local wheels where the machine has them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: setup
	@test -d "$(DATA_ROOT)/consep-256" || { \
		echo "error: dataset $(DATA_ROOT)/consep-256 not found."; \
		echo "Download CoNSeP from https://warwick.ac.uk/fac/cross_fac/tia/data/hovernet/ and unpack it so that"; \
		echo "$(DATA_ROOT)/consep-256/Train/Images and .../Labels exist (or set DATA_ROOT=folder)."; \
		exit 2; }
	DATA_ROOT=$(DATA_ROOT) OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(BIN)/granularity study --preset quick --experiment $(EXPERIMENT)
	$(BIN)/granularity compare --experiment $(EXPERIMENT) --out out/compare
	@echo "Tables and figures (fig3.png, fig4.png): out/compare/"
	@if [ -n "$$MLFLOW_TRACKING_URI" ]; then \
		echo "Open the runs at $$MLFLOW_TRACKING_URI (experiment $(EXPERIMENT))"; \
	else \
		echo "Open the runs with: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db  (then http://127.0.0.1:5000)"; \
	fi

bench: setup
	$(BIN)/python bench/bench_prepare.py
	$(BIN)/python bench/bench_classify.py
	$(BIN)/python bench/bench_segment.py
	$(BIN)/python bench/bench_compare.py

clean:
	rm -rf .cache out mlruns mlartifacts
