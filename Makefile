# The commands the README names. Everything runs from a virtualenv in .venv.
# The interpreter .venv is built on: the system's python3 when it is 3.11 or newer and can make
# a venv, else the first python3 on PATH; `make install PYTHON=python3.12` picks another. How
# the interpreter was compiled matters: pyenv's default build (no --enable-optimizations, no
# --with-lto, a shared libpython) runs each gateway request with 12% more instructions than
# Debian's python3 (docs/performance.md). Delete .venv to rebuild it on another one.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run serve test pytest lint format typecheck bench clean

$(STAMP): requirements.txt requirements-dev.txt setup.py setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv with the gateway and its test tools.

run: $(STAMP) ## Run the gateway offline against the bundled DashScope simulator.
	bash scripts/run-offline.sh

serve: $(STAMP) ## Serve the gateway behind nginx (deploy/nginx.conf), as in production.
	bash scripts/serve.sh

test: lint typecheck pytest ## Lint, type-check and run the whole test suite.

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP) ## Benchmark the gateway against direct and nginx references (bench/README.md).
	bash bench/run.sh

clean:
	rm -rf $(VENV) .sdk-venvs instance .pytest_cache .mypy_cache .ruff_cache
