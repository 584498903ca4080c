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

## ruff, mypy --strict and the import contracts
lint: install
	.venv/bin/pip install --quiet ruff mypy
	.venv/bin/ruff check .
	.venv/bin/mypy --strict shardbroker
	.venv/bin/lint-imports

bench: install
	.venv/bin/python -m loadtests.bench $(ARGS)
