# Two commands on a fresh machine:
#   make run    installs into .venv and trains the quickstart on 2 local workers
#   make test   installs into .venv and runs the whole test suite
#   make check  the fast tier only (no test that starts processes): the inner loop, under 3 minutes
# torch is pinned to the CPU build that lies on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
TORCH_PIN ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH_PIN)"
	$(VENV)/bin/pip install --quiet -e ".[federated,hf,data,export,ray,k8s,mlflow,wandb,dev]" "$(TORCH_PIN)"
	touch $@

.PHONY: install run test check
install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/shoal run

# The suite runs on two pytest-xdist workers, a file's tests in order on one of them and the `machine`
# tests (network namespaces, Ray, SLURM) one at a time (tests/conftest.py); TEST_WORKERS=1 runs it in
# one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup) tests

# Tests marked `slow` start processes or clusters (tests/conftest.py says which markers imply it).
check: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests
