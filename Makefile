# The two commands of the README: `make run` (set up, then the embedded pipeline) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test test-all clean-state

$(STAMP): requirements/lock.txt pyproject.toml
	@bash scripts/setup.sh
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	@bash scripts/run-embedded.sh

test: $(STAMP)
	@bash scripts/test.sh

clean-state:
	rm -rf .state
