# The README's two commands: `make train` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml
# The layout `make train` uses: 2 ranks on the local Ray cluster, experts split over them
# (gloo on CPU). LAYOUT= trains in one process without Ray; see docs/launching.md.
LAYOUT ?= parallel.dp=2 parallel.ep=2
# Dotted settings on make's command line are moe train overrides (values without spaces):
#   make train CONFIG=configs/tiny.yaml data.path=DIR model.vocab_size=2048
OVERRIDES := $(foreach w,$(filter-out $(LAYOUT),$(MAKEOVERRIDES)),$(if $(findstring .,$(firstword $(subst =, ,$(w)))),$(w)))

.PHONY: setup train test clean

setup: $(STAMP)

# torch first, pinned: the registry's newest torch is a multi-GB CUDA build; 2.13.0 is a
# local CPU wheel. The project's own ranges are then already satisfied by it, and
# constraints.txt pins every other package (regenerate: pip freeze --exclude-editable).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "pip==26.3"
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/moe train $(CONFIG) $(LAYOUT) $(OVERRIDES)

# --durations: the suite must stay under CI's 20 minutes; the slowest tests are listed so
# the next addition knows what it competes with.
test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV) runs
