# Two entry points for a fresh clone: `make run` (demo gateway) and `make test` (every check).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
BIN := $(VENV)/bin

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/ruff check actors api scripts tests
	$(BIN)/mypy
	TMG_MIN_TESTS=300 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench_registry.py
	$(BIN)/python scripts/bench_churn.py
	$(BIN)/python scripts/bench_inference.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
