# The commands of the README: `make demo` (set up, then run the main job on the built-in
# synthetic cohort, sized for ten minutes on a 2-core CPU), `make demo-full` (every arm and
# stage, hours on that CPU) and `make test` (set up, lint with ruff, then run the test suite).
# `.ci/run` calls `make test`.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo demo-full test bench setup

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh

demo: setup
	$(BIN)/drasclr demo --out demo_output

demo-full: setup
	$(BIN)/drasclr demo --full --out demo_output_full

test: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

bench: setup
	$(BIN)/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-only
