# Two entry points do all the set-up on a fresh Python 3.11 machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU torch pin lives here, not in pyproject.toml (GPU users bring their own torch).
CONSTRAINTS ?= constraints-cpu.txt

.PHONY: demo test install clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
