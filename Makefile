# Two entry points do all the set-up on a fresh Python 3.11 machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU torch pin lives here, not in pyproject.toml (GPU users bring their own torch).
CONSTRAINTS ?= constraints-cpu.txt

.PHONY: demo test install benchmarks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install -c $(CONSTRAINTS) -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m ifsearch.launch

test: install
	$(BIN)/python -m pytest tests

# Every benchmark in turn (one at a time: they time things), refreshing docs/benchmarks.md.
benchmarks: install
	$(BIN)/python benchmarks/loss_speed.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/search_efficiency.py
	$(BIN)/python benchmarks/study.py

clean:
	rm -rf $(VENV) runs .pytest_cache
