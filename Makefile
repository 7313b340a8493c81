# The two commands of the README: `make run` (set up, then the embedded pipeline) and `make test`.
# `make test` is the fast set (under 5 minutes on 2 cores); `make test-all` adds the slow tests (whole
# DAGs through Airflow, the real embedded model) and the network ones (pin sets resolved on PyPI): CI.
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
	@bash scripts/test.sh -m "not slow and not network"

test-all: $(STAMP)
	@bash scripts/test.sh

clean-state:
	rm -rf .state
