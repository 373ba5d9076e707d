# Two commands do everything on a fresh machine: `make demo` and `make test`. Each creates .venv (Python 3.12)
# and installs the pinned requirements the first time.
PY := .venv/bin/python
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-slow bench lint

demo:
	@bash scripts/make_venv.sh requirements.txt
	rm -rf runs/tiny_chain
	$(PY) -m internlm2_jax.launch experiments/tiny_chain.py

test:
	@bash scripts/make_venv.sh requirements-test.txt
	.venv/bin/lint-imports
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow:
	@bash scripts/make_venv.sh requirements-test.txt
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow

bench:
	@bash scripts/make_venv.sh requirements-test.txt
	$(PY) benchmarks/forward_throughput.py

lint:
	@bash scripts/make_venv.sh requirements-test.txt
	.venv/bin/ruff check .
