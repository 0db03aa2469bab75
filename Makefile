# Two entry points for a fresh clone: `make run` (demo gateway) and `make test` (every check).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
BIN := $(VENV)/bin

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test bench clean postgres

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/demo.py

# The tests start their own PostgreSQL server (scripts/postgres_server.py): Debian's package,
# installed here when missing (not needed when TMG_TEST_POSTGRES_URL names a server).
postgres:
	@if [ -z "$$TMG_TEST_POSTGRES_URL" ] && ! command -v initdb >/dev/null 2>&1 \
	    && [ -z "$$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ]; then \
	  echo "installing Debian's postgresql package for the tests"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install \
	    -y -qq --no-install-recommends postgresql >/dev/null; \
	fi

test: $(STAMP) postgres
	$(BIN)/ruff check actors api scripts tests
	$(BIN)/mypy
	TMG_MIN_TESTS=300 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench_registry.py
	$(BIN)/python scripts/bench_churn.py
	$(BIN)/python scripts/bench_inference.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
