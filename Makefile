# The two commands of the README: `make demo` (set up, then run the main job on the built-in
# synthetic cohort) and `make test` (set up, lint with ruff, then run the test suite).
# `.ci/run` calls `make test`.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench setup

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh

demo: setup
	$(BIN)/drasclr demo --out demo_output

test: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

bench: setup
	$(BIN)/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-only
