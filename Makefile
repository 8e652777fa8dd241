# Developer shortcuts. `make test` is what CI runs (through .ci/run).
PY ?= .venv/bin/python

.PHONY: install style types test test-thorough bench

install:
	python3 -m venv .venv
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev]'

style:
	$(PY) -m ruff check syncd tests bench schema
	$(PY) -m ruff format --check syncd tests bench schema

types:
	$(PY) -m mypy

test:
	$(PY) -m pytest

test-thorough:
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest

bench:
	$(PY) bench/reducers.py
	$(PY) bench/routing.py
	$(PY) bench/codec.py
	$(PY) bench/journal.py
	$(PY) bench/fanout.py
	$(PY) bench/throughput.py
	$(PY) bench/throughput.py --backend postgres
	$(PY) bench/journal.py --postgres
	$(PY) bench/redis_fanout.py
	$(PY) bench/replicas.py
	$(PY) bench/visibility.py
	$(PY) bench/visibility_e2e.py
	$(PY) bench/peers/run.py
