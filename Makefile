# convnext-serve: `make setup` (or `make run`) on a fresh machine, `make test` for the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test lint format docs bench bench-serve demo-models mutation clean

setup: $(STAMP)

# One virtual environment with the project (editable) and its test tools.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Serves the demo models at http://127.0.0.1:8000 (metrics :8080); trains them on first use.
run: setup
	$(VENV)/bin/convnext-serve run

# Trains the three demo models that are missing (about 14 minutes on 2 CPU cores), on
# synthetic data with a fixed seed, into $$CONVNEXT_SERVE_DEMO_DIR (default ~/.cache/convnext-serve/demo).
demo-models: setup
	$(PY) -m models.demo

# The serving benchmark (bench/serve_bench.py) and the model benchmarks. The load comes from
# wrk (Debian's package, installed here when apt-get can); without it, Python clients.
bench-serve: setup
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq wrk >/dev/null; } || echo "note: no wrk: Python load clients"
	$(PY) bench/serve_bench.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PY) -m pytest

# Mutation testing of the pure modules ([tool.mutmut] in pyproject.toml) against their fast
# unit tests; docs/testing.md has the table. Not part of `make test`: it takes minutes.
mutation: setup
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2
	$(VENV)/bin/mutmut results --all true

# The docs site (docs/, mkdocs.yml) at http://127.0.0.1:8001; the tests build it with --strict.
docs: setup
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8001

bench: setup
	$(PY) bench/models_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info mutants site
