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
# module fixtures are built once.
PYTEST = OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

test:
	$(PYTEST)

test-fast:
	$(PYTEST) -m "not slow"

lint:
	$(BIN)/ruff check llava_tune tests scripts
