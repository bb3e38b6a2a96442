#!/usr/bin/env bash
# `make test-slurm`: start a real SLURM cluster on this machine (slurm/local-cluster.sh --install,
# which apt-installs the test-slurm packages of system-packages.txt when missing), run
# tests/cli/test_slurm.py against it with sbatch --wait, stop the cluster. Where SLURM cannot be had,
# it says so loudly and exits 0; SLURM without srun's pmix plugin fails (local-cluster exit 4).
#   slurm/ci-test.sh [PYTHON]        (default .venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
# two slurmd on this host (node1, node2) so the multi-node script really spans two nodes
export HPCATTN_SLURM_NODES=${HPCATTN_SLURM_NODES:-2} HPCATTN_SLURM_CPUS=${HPCATTN_SLURM_CPUS:-4}
skip() {
    echo "=================================================================================="
    echo "== SLURM INTEGRATION TESTS SKIPPED: $1"
    echo "=================================================================================="
    exit 0
}
if [[ $(id -u) != 0 ]] && ! command -v slurmctld >/dev/null; then
    skip "SLURM is not installed and installing it (apt-get) needs root"
fi
[[ $(id -u) == 0 ]] || skip "starting slurmctld/slurmd needs root"
env_line=$(slurm/local-cluster.sh start --install)
rc=$?
(( rc == 3 )) && skip "SLURM is not installed and apt-get could not install it (system-packages.txt)"
(( rc != 0 )) && { echo "slurm/ci-test.sh: the local SLURM cluster did not start" >&2; exit 1; }
eval "$env_line"
trap 'slurm/local-cluster.sh stop' EXIT
echo "== SLURM integration tests on $(sinfo -h -o '%D node(s) %N') ($SLURM_CONF)"
HPCATTN_SLURM_TESTS=require timeout 1800 "$PY" -m pytest -p no:cacheprovider -q -rs -m slurm tests/cli/test_slurm.py
