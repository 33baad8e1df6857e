# Every target creates .venv on first use and (re)installs when pyproject.toml changes.
# EXTRAS picks the optional dependency sets for `make test` (CI adds `bench` for the peer-router tests).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
EXTRAS ?= test,lint
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: test lint demo bench fidelity clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[$(subst -,$(comma),$*)]'
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/fleetroute demo

bench: $(VENV)/.installed-test-lint-bench
	$(BIN)/python bench/fidelity.py --output bench/results/fidelity
	$(BIN)/python bench/decision_time.py
	$(BIN)/python bench/prefix_index.py
	$(BIN)/python bench/overhead.py --output bench/results/overhead
	$(BIN)/python bench/reproductions.py --output bench/results/reproductions

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
