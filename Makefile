# Two commands do everything:  `make demo` (the embedded demo)  and  `make test` (the test suite).
# Both set up .venv on first use (CPU PyTorch 2.13.0 first, so pip never pulls a CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo demo-lm test lint setup clean

$(BIN)/memscan: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/memscan

setup: $(BIN)/memscan

demo: setup
	$(BIN)/memscan demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

demo-lm: setup
	$(BIN)/memscan demo lm --out runs/demo-lm-$$(date +%Y%m%d-%H%M%S)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
