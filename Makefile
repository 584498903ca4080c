# ShardBroker: shortcuts for the scripts in scripts/ (the quick start needs only those).
.PHONY: install run test lint bench

install:
	scripts/install

## Install and start the broker on 127.0.0.1:1883 with ./shardbroker-data
run:
	scripts/run $(ARGS)

## Install and run the whole test suite
test:
	scripts/test $(PYTEST_ARGS)

## ruff, mypy --strict and the import contracts, on the package as installed (scripts/layout.py)
lint: install
	.venv/bin/pip install --quiet ruff mypy
	.venv/bin/ruff check .
	rm -rf .lint && .venv/bin/python scripts/layout.py .lint
	cd .lint && ../.venv/bin/mypy --strict --cache-dir ../.mypy_cache shardbroker
	cd .lint && PYTHONPATH=. ../.venv/bin/lint-imports ../pyproject.toml

bench: install
	.venv/bin/python -m loadtests.bench $(ARGS)
