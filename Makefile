# make demo   - the embedded demo on a CPU (installs .venv on first use)
# make test   - the test suite (installs .venv on first use); CI runs exactly this
# make test-fast - skip the slow end-to-end checks
BIN = $(shell bash scripts/setup_env.sh)
OUT ?= demo_out

.PHONY: demo test test-fast lint
demo:
	bash scripts/demo.sh $(OUT)

# Two pytest workers, one per core, each torch on one thread (two torch processes with a
# thread per core each would fight over the cores); a file's tests stay on one worker, so its
# module fixtures are built once. --no-loadscope-reorder keeps the files in the order
# tests/conftest.py gives them (longest first: the demo); xdist's default reorder puts the
# files with the most tests first, which started the demo's 18 minutes 9 minutes in.
PYTEST = OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

test:
	$(PYTEST)

test-fast:
	$(PYTEST) -m "not slow"

lint:
	$(BIN)/ruff check llava_tune tests scripts
