# make run: set up and run the main job.  make test: set up and run the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup run test test-fast mutations lint
setup: $(STAMP)

# torch/torchvision first, pinned: on the project's machines they install from local wheels
# (an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	test -d $(FMNIST) || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)
	touch $(STAMP)

# The main job: distil the bundled Fashion-MNIST teacher into a one-step DMD2 generator
# (~15 min on 2 CPU cores); the run dir holds samples.png, results.json and generator/.
run: setup
	$(PY) -m dmd.train experiment=fmnist_dmd2

test: setup
	$(PY) -m pytest -q

# The fast tier (slow-marked tests left out): about 3.5 minutes on 2 cores.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Plausible bugs applied one at a time to a copy of the tree, each against the fast tier.
mutations: setup
	$(PY) experiments/mutations.py

lint: setup
	$(PY) -m ruff check dmd tests experiments
