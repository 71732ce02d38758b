# The README's two commands, each whole on a fresh clone (it installs first): `make sweep` runs the default
# sweep and says where its report is; `make test` tests (.ci/run runs it).
PYTHON ?= python3
# Root needs no sudo; anyone else gets it when it exists.
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

.PHONY: sweep test install python-deps system-deps
# `python -m sweeps.cli` is the l0sweep command, found even where pip's scripts folder is not on PATH.
sweep: python-deps
	$(PYTHON) -m sweeps.cli run studies/default.yaml --workers 2
	@echo "browse it: $(PYTHON) -m sweeps.cli ui   (MLflow UI http://127.0.0.1:5000, optuna-dashboard http://127.0.0.1:8080)"

# One test process per core (at most 4), a file per process at a time: a file's shared fixtures are made once.
test: install
	$(PYTHON) -m pytest -n auto --maxprocesses 4 --dist loadfile

install: system-deps python-deps

# Built with the setuptools already installed where it can build an editable wheel on its own (pyproject asks for
# >=68; bdist_wheel is in setuptools from 70.1): pip's isolated build environment cost ~8 s of every `make test`.
NO_ISOLATION = $(shell $(PYTHON) -c "import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))" 2>/dev/null && echo --no-build-isolation)
python-deps:
	$(PYTHON) -m pip install $(NO_ISOLATION) -e ".[test]"

# The tests use a real browser (the report, the MLflow UI) and a real PostgreSQL server (distributed sweeps).
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get install -y --no-install-recommends $$missing || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends $$missing; }; \
	fi
