PYTHON ?= python3
PIP := $(PYTHON) -m pip install --disable-pip-version-check --root-user-action=ignore -q
PYTEST_ARGS ?=

# The lowest transformers that requirements.txt allows, with the tokenizers and
# huggingface_hub releases it works with: installed into FLOOR_DIR (only what the
# environment lacks for them), which PYTHONPATH puts in front of the same torch and
# everything else, to run FLOOR_TESTS a second time.
FLOOR_TRANSFORMERS := $(shell sed -n 's/^transformers>=\([0-9.]*\).*/\1/p' requirements.txt)
FLOOR_PINS := transformers==$(FLOOR_TRANSFORMERS) tokenizers==0.20.3 huggingface-hub==0.36.2
FLOOR_DIR := .deps/transformers-floor
FLOOR_TESTS := tests/test_text.py tests/test_models.py tests/test_checkpoint.py tests/test_training.py
WITH_FLOOR := PYTHONPATH=$(abspath $(FLOOR_DIR))$${PYTHONPATH:+:$$PYTHONPATH}

.PHONY: install test test-floor floor-deps test-fast test-gpu demo

# Idempotent: pip only checks the pins when everything is already installed.
install:
	$(PIP) -r requirements.txt

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-floor

test-floor: install floor-deps
	$(WITH_FLOOR) $(PYTHON) -c 'import transformers as t; from packaging.version import Version as V; \
	    print("transformers", t.__version__, "from", t.__file__); \
	    assert V(t.__version__) == V("$(FLOOR_TRANSFORMERS)"), "not the floor version"'
	$(WITH_FLOOR) $(PYTHON) -m pytest $(FLOOR_TESTS) $(PYTEST_ARGS)

# Idempotent: reinstalls only when FLOOR_PINS change. pip plans against the environment
# (--dry-run --report) and only the planned packages go into FLOOR_DIR.
floor-deps:
	@if [ "$$(cat $(FLOOR_DIR)/pins.txt 2>/dev/null)" != "$(FLOOR_PINS)" ]; then \
	    echo "installing $(FLOOR_PINS) into $(FLOOR_DIR)"; \
	    rm -rf $(FLOOR_DIR) && mkdir -p $(FLOOR_DIR) && \
	    $(PIP) --dry-run --report $(FLOOR_DIR)/plan.json $(FLOOR_PINS) && \
	    planned=$$($(PYTHON) -c 'import json, sys; print(*(p["metadata"]["name"] + "==" + \
	        p["metadata"]["version"] for p in json.load(open(sys.argv[1]))["install"]))' \
	        $(FLOOR_DIR)/plan.json) && \
	    $(PIP) --no-deps --target $(FLOOR_DIR) $$planned && \
	    echo "$(FLOOR_PINS)" > $(FLOOR_DIR)/pins.txt; \
	fi

demo: install
	$(PYTHON) tools/demo.py

test-fast: install
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

# The CUDA tests (tests marked gpu); on a machine without CUDA each is skipped with the reason.
test-gpu: install
	$(PYTHON) -m pytest -m gpu -rs $(PYTEST_ARGS)
