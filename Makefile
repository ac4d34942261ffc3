# The few commands people run. `make test` and `make main` set everything up first.
PY := .venv/bin/python

.PHONY: setup test test-fast main bench lint clean

setup:
	bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

main: setup
	bash scripts/main_job.sh

bench:
	$(PY) bench/bench_mask.py

lint:
	.venv/bin/ruff check .

clean:
	rm -rf build cure_kernels/_C*.so
