# `make test` is the one test command: README gives it to users, .ci/run runs it.
PYTHON ?= python3

.PHONY: install test
install:
	$(PYTHON) -m pip install -e ".[test]"

test: install
	$(PYTHON) -m pytest
