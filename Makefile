# qtb-pipe: the two commands a newcomer needs are `make demo` and `make test`;
# both run `make setup` first (quick when everything is already installed).
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup test lint demo bench bench-smoke clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two workers: most of the suite waits on engines' key derivation and on subprocesses.
PYTEST_ARGS ?= -n 2
test: setup lint
	$(BIN)/pytest -ra $(PYTEST_ARGS)

demo: setup
	$(BIN)/qtb-pipe demo $(DEMO_ARGS)

bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-smoke: setup
	$(BIN)/python -m benchmarks.run --smoke $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
