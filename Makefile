# make demo   - the embedded demo on a CPU (installs .venv on first use)
# make test   - the test suite (installs .venv on first use); CI runs exactly this
# make test-fast - skip the slow end-to-end checks
BIN = $(shell bash scripts/setup_env.sh)
OUT ?= demo_out

.PHONY: demo test test-fast lint
demo:
	bash scripts/demo.sh $(OUT)

test:
	$(BIN)/python -m pytest -q

test-fast:
	$(BIN)/python -m pytest -q -m "not slow"

lint:
	$(BIN)/ruff check llava_tune tests scripts
