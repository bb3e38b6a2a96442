# `make demo` and `make test` work on a fresh machine with Python 3.9+, make and a compiler.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RANKS ?= 4
DEMO_DIR ?= demo
DEMO_SEQ ?= 1048576
DEMO_MASK ?= causal+window:256
TEST_TIMEOUT ?= 1800

# Open MPI: allow root (containers, CI) and more ranks than cores (laptops, CI).
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PRTE_MCA_rmaps_default_mapping_policy := :oversubscribe
export OMPI_MCA_rmaps_base_oversubscribe := true
export PYTHONUNBUFFERED := 1

.PHONY: all demo test test-serial test-mpi test-slurm clean
all: test

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[mpi,test]'
	touch $@

demo: $(VENV)/.installed
	mkdir -p $(DEMO_DIR)
	$(BIN)/hpcattn gen $(DEMO_DIR)/in.h5 --seq $(DEMO_SEQ) --heads 4 --kv-heads 2 --head-dim 64 --seed 1
	$(BIN)/mpiexec -n $(RANKS) $(BIN)/python -m hpcattn run $(DEMO_DIR)/in.h5 $(DEMO_DIR)/out.h5 --mask $(DEMO_MASK)
	$(BIN)/hpcattn verify $(DEMO_DIR)/in.h5 $(DEMO_DIR)/out.h5 --rows 256

test: test-serial test-mpi test-slurm

test-serial: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not mpi" tests

test-mpi: $(VENV)/.installed
	for n in 2 3 4; do \
	  echo "== MPI tests on $$n ranks"; \
	  timeout $(TEST_TIMEOUT) $(BIN)/mpiexec -n $$n $(BIN)/python -m mpi4py -m pytest --with-mpi -m mpi \
	    -p no:cacheprovider -q tests || exit 1; \
	done

# a real one-node SLURM (two slurmd) on this machine; skips loudly where SLURM cannot be installed
test-slurm: $(VENV)/.installed
	slurm/ci-test.sh $(BIN)/python

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
