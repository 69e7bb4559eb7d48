# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create .venv, install the pinned CPU build of torch and curvbound (editable, dev extra).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
WHEELS := $(wildcard /opt/wheels)
PIP    := $(BIN)/python -m pip install -q -c constraints.txt $(if $(WHEELS),--find-links $(WHEELS))

.PHONY: setup demo test test-fast bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $@

# the demo also needs the `demo` extra (scikit-learn's bundled digits, matplotlib, tqdm)
demo: $(VENV)/.demo
	$(BIN)/python -m curvbound demo

$(VENV)/.demo: $(VENV)/.installed
	$(PIP) -e ".[dev,demo]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q tests -m "not slow"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
