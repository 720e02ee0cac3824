# qtb-pipe: the two commands a newcomer needs are `make demo` and `make test`;
# both run `make setup` first (quick when everything is already installed).
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup test test-slow lint demo bench bench-smoke dist clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two workers: most of the suite waits on engines' key derivation and on subprocesses.
# `make test`: the fast tiers (unit, shim pty, end to end on small worlds); `make test-slow`: the
# benchmark smoke, the large dedup world, scrypt's default work factor. .ci/run runs both. pytest
# exits 5 when a tier collects no test, and make fails on it.
PYTEST_ARGS ?= -n 2
test: setup lint
	$(BIN)/pytest -ra $(PYTEST_ARGS) -m "not slow"

test-slow: setup
	$(BIN)/pytest -ra $(PYTEST_ARGS) -m slow

demo: setup
	$(BIN)/qubes-sim demo $(DEMO_ARGS)

bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# the release: dom0 tarball (reproducible), dom0 RPM, backup-qube wheel, SHA256SUMS (docs/release.md)
dist: setup
	$(BIN)/python scripts/dist.py

bench-smoke: setup
	$(BIN)/python -m benchmarks.run --smoke $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
