# One-command setup on a fresh machine: `make demo` (every recipe, quick scale, one report) and `make test`.
# Setup is idempotent: a stamp file skips the install when nothing changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ratelab-installed
# Pinned for this project's CPU machines (README, "Two commands"); pyproject.toml states compatible ranges elsewhere.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# Reference calibration library of the tests, installed without its heavy optional stack (see pyproject.toml).
NETCAL_PIN ?= netcal==1.3.6
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench readme clean help

help:
	@echo "make demo   - set up .venv, run every recipe at --scale quick, write $(DEMO_OUT)/report.html"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make lint   - ruff check"
	@echo "make readme - re-run the demo, record it (docs/records/demo_quick.json) and regenerate README's figures"
	@echo "make bench  - CPU benchmarks: every table of docs/benchmarks.md (benchmarks/run_all.sh, ~12 min idle)"

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(NETCAL_PIN)
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/ratelab demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	bash benchmarks/run_all.sh

readme: setup
	$(PY) scripts/readme_figures.py --run

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
