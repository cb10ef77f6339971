PYTHON ?= python3
PIP := $(PYTHON) -m pip install --disable-pip-version-check --root-user-action=ignore -q
PYTEST_ARGS ?=

.PHONY: install test test-fast demo

# Idempotent: pip only checks the pins when everything is already installed.
install:
	$(PIP) -r requirements.txt

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: install
	$(PYTHON) tools/demo.py

test-fast: install
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)
