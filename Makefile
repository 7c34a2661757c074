# Two commands do all the set-up: `make demo` and `make test` (see README).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrap-done

# Offline Prefect, with the project's own home (SQLite database, server log) inside the checkout.
# The other Prefect settings are in prefect.toml (and imagesmith/offline.py for runs outside this folder).
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(CURDIR)/.prefect
# the tiers default to ./data/fast and ./data/bulk; set these to put them on real disks
export IMAGESMITH_FAST_DIR ?= $(CURDIR)/data/fast
export IMAGESMITH_BULK_DIR ?= $(CURDIR)/data/bulk

PYTEST_ARGS ?=

.PHONY: setup demo test test-fast server stop-server doctor clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh scripts/make_pillow_shim.py
	bash scripts/bootstrap.sh
	touch $@

## make demo: set up, start a local Prefect server on 127.0.0.1 if none runs, train every model family small on the bundled sample (~7 min on 2 cores)
demo: $(STAMP)
	$(VENV)/bin/imagesmith demo

## make test: set up, then run the whole test suite (what CI runs)
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## make test-fast: the tests not marked slow (no Prefect server, no subprocess kills): under 2 minutes
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

server: $(STAMP)
	$(VENV)/bin/imagesmith server start

stop-server: $(STAMP)
	$(VENV)/bin/imagesmith server stop

doctor: $(STAMP)
	$(VENV)/bin/imagesmith doctor

clean:
	rm -rf $(VENV) .pytest_cache
