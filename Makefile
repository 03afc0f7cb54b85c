# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed first from constraints.txt (a CPU wheel) unless a torch is already importable
# in the venv (e.g. a CUDA build you installed yourself); every later install is held to the same pins.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.installed-test
ZOO    := .cache/zoo
DEMO   ?= runs/demo
EVOMERGE := $(VENV)/bin/evomerge --offline

BUILTIN ?= runs/builtin
HFHOME := .cache/hf-builtin

.PHONY: test lint demo demo-builtin install zoo tasks clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# `make install`: the package alone (what `make demo` needs); the tests' extras (pytest, mergekit as
# the merge operators' reference, ruff, selenium) only for `make test` and `make lint`.
$(STAMP): $(PY) pyproject.toml constraints.txt
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e .
	@touch $(STAMP)

$(TESTSTAMP): $(STAMP)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	@touch $(TESTSTAMP)

install: $(STAMP)

# Lint and format check first (seconds), the zoo (cached after the first build), then the suite in
# TEST_WORKERS processes, one test module per process at a time (a module's shared campaign runs
# once); the 25 slowest tests and fixtures are listed at the end, so growth is seen when it happens.
TEST_WORKERS ?= 2
test: lint
	$(EVOMERGE) zoo build --out $(ZOO)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=25

lint: $(TESTSTAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The default campaign (experiments/demo.yaml, which reads the zoo from .cache/zoo): build the zoo,
# check its quality, run the campaign (or finish it, if an earlier `make demo` was interrupted),
# print the front, export the knee of the front scored on the held-out report split.
demo: $(STAMP)
	$(EVOMERGE) zoo build --out $(ZOO)
	$(EVOMERGE) zoo eval $(ZOO) --tasks evaluators/zoo --strict --limit 200
	@if [ -f $(DEMO)/campaign.json ]; then $(EVOMERGE) resume $(DEMO); \
	 else $(EVOMERGE) run experiments/demo.yaml --out $(DEMO); fi
	$(EVOMERGE) pareto $(DEMO)
	$(EVOMERGE) export $(DEMO) --best --out $(DEMO)/export --force --quiet

# lm-eval's own built-in gsm8k and mbpp over the zoo, offline: generated rows in those datasets'
# formats written into a Hugging Face home of its own (never the one you use with a network), then
# the campaign (experiments/builtin_tasks.yaml), its front and the export, all with HF_HOME on it.
demo-builtin: $(STAMP)
	$(EVOMERGE) zoo build --out $(ZOO)
	$(EVOMERGE) zoo builtin --out $(HFHOME)
	@export HF_HOME=$(CURDIR)/$(HFHOME); set -e; \
	 if [ -f $(BUILTIN)/campaign.json ]; then $(EVOMERGE) resume $(BUILTIN); \
	 else $(EVOMERGE) run experiments/builtin_tasks.yaml --out $(BUILTIN); fi; \
	 $(EVOMERGE) pareto $(BUILTIN); \
	 $(EVOMERGE) export $(BUILTIN) --best --out $(BUILTIN)/export --force --quiet

zoo: $(STAMP)
	$(EVOMERGE) zoo build --out $(ZOO)

tasks: $(STAMP)
	$(VENV)/bin/evomerge zoo tasks --out evaluators/zoo

clean:
	rm -rf $(VENV) .cache .pytest_cache runs
