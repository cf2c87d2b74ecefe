# Two entry points do all the set-up on a fresh Python 3.11 machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# The versions the tests pass with, every dependency and torch included (README: "Two commands"
# says how to refresh it). Used as constraints: pyproject.toml keeps its ranges for GPU users.
CONSTRAINTS ?= requirements-lock.txt
# Where pip finds PyTorch's CPU wheel. Empty = pip's own configuration; on a machine whose pip
# only knows PyPI, `torch==2.13.0` there is the CUDA build (several GB), so pass
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
PIP_TORCH_INDEX := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))

# PostgreSQL (Debian's packages) backs the MLflow server of the multi-node cluster test.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install postgres chromium rehearsal benchmarks clean

# pip's output (hundreds of lines) goes to $(VENV)/install.log; its tail is shown if it fails.
$(BIN)/python:
	@echo "creating $(VENV)"
	@$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	@echo "installing ifsearch and the locked versions of $(CONSTRAINTS) (log: $(VENV)/install.log)"
	@$(BIN)/pip install $(PIP_TORCH_INDEX) -c $(CONSTRAINTS) -e ".[test]" > $(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; echo "pip failed: see $(VENV)/install.log"; exit 1; }
	@touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m ifsearch.launch

test: install postgres chromium
	$(BIN)/python -m pytest tests

postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  echo "installing PostgreSQL from Debian's packages"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }

# Debian's Chromium: tests/search/test_mlflow_ui.py opens the MLflow UI in it, headless.
chromium:
	@[ -x /usr/bin/chromium ] || command -v chromium >/dev/null || { \
	  echo "installing Chromium from Debian's packages"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

# deploy/README.md on this machine: Postgres-backed MLflow, a 2-node Ray cluster, `ray job submit`.
rehearsal: install postgres
	$(BIN)/python deploy/rehearsal.py

# Every benchmark in turn (one at a time: they time things), refreshing docs/benchmarks.md.
benchmarks: install
	$(BIN)/python benchmarks/loss_speed.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/rung_metric.py
	$(BIN)/python benchmarks/search_efficiency.py
	$(BIN)/python benchmarks/study.py

clean:
	rm -rf $(VENV) runs .pytest_cache
