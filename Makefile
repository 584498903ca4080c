# ShardBroker: the two commands of the quick start, and a few more.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: run test install lint typecheck bench load clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test,load]'
	touch $@

install: $(VENV)/.installed

## Install and start the broker on 1883 with ./shardbroker-data
run: install
	$(VENV)/bin/shardbroker serve $(ARGS)

## Install and run the whole test suite
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PIP) install --quiet ruff mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy shardbroker storage

bench: install
	$(PY) -m loadtests.bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
