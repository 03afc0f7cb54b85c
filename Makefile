# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed first from constraints.txt (a CPU wheel) unless a torch is already importable
# in the venv (e.g. a CUDA build you installed yourself); every later install is held to the same pins.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
ZOO    ?= .cache/zoo

.PHONY: test demo install zoo tasks clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/evomerge --offline zoo build --out $(ZOO)
	$(VENV)/bin/evomerge --offline zoo eval $(ZOO) --tasks evaluators/zoo --strict

zoo: $(STAMP)
	$(VENV)/bin/evomerge --offline zoo build --out $(ZOO)

tasks: $(STAMP)
	$(VENV)/bin/evomerge zoo tasks --out evaluators/zoo

clean:
	rm -rf $(VENV) .cache .pytest_cache
