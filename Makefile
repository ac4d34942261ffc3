# The few commands people run. `make test` and `make main` set everything up first.
PY := .venv/bin/python

.PHONY: setup test test-fast main bench lint clean aot-check aot-check-triton36

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

# Compile every Triton kernel for sm_80 and sm_90 through the real launchers, without a GPU
# (scripts/triton_aot_check.py; tests/test_triton_aot.py runs it too).
aot-check:
	env -u TRITON_INTERPRET $(PY) scripts/triton_aot_check.py

# The same with Triton 3.6, the release GPU machines with PyTorch 2.11 carry: installed without its
# dependencies into build/triton36 and put ahead of the venv's Triton (only the compiler is used; the
# CPU torch of the venv stays). Run on 2026-12-07: every kernel compiles, no fma/.ftz/FFMA, but registers
# exceed the 3.8 ceilings (e.g. _refine_kernel 151-172 vs 80 with 256-bin digits; _sgd_step_kernel spills
# up to 112 B on sm_90): the ceilings in scripts/triton_aot_check.py are 3.8's, so this target fails on them.
TRITON36 := build/triton36
aot-check-triton36:
	test -d $(TRITON36)/triton || $(PY) -m pip install --no-deps --target $(TRITON36) triton==3.6.0
	env -u TRITON_INTERPRET PYTHONPATH=$(TRITON36) $(PY) scripts/triton_aot_check.py
