# One command each: `make demo` (install + the main job) and `make test` (install + the test suite).
# TORCH picks the torch build; the default is the CPU wheel of torch 2.13.0. Use e.g. TORCH="torch==2.13.0"
# with your CUDA index configured in pip to get a GPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEMO_OUT ?= qdiffuse-demo
# The suite runs in TEST_WORKERS processes (pytest-xdist), one torch thread each.
TEST_WORKERS ?= 2

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/qdiffuse demo --out $(DEMO_OUT) --overwrite

lint: install
	$(VENV)/bin/ruff check src tests

test: lint
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
