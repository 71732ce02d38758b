# `make test` is the one test command: README gives it to users, .ci/run runs it.
PYTHON ?= python3
# Root needs no sudo; anyone else gets it when it exists.
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

.PHONY: install system-deps test
install: system-deps
	$(PYTHON) -m pip install -e ".[test]"

# The tests use a real browser (the report) and a real PostgreSQL server (distributed sweeps).
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get install -y --no-install-recommends $$missing || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends $$missing; }; \
	fi

test: install
	$(PYTHON) -m pytest
