# Sourced by every hpcattn batch script (slurm/*.sbatch). Not a job script itself.
#
# Environment that configures every script (all optional):
#   HPCATTN_HOME      the project checkout (default: found from the submitted script's path)
#   HPCATTN_PYTHON    the Python with hpcattn installed (default: $HPCATTN_HOME/.venv/bin/python,
#                     else python3 on PATH)
#   HPCATTN_LAUNCHER  srun (default) | mpiexec
#   HPCATTN_SRUN_MPI  srun's --mpi plugin (default pmix; the pip Open MPI wheel speaks PMIx)
#   HPCATTN_SRUN_FLAGS, HPCATTN_MPIEXEC_FLAGS   extra launcher flags
#
# GPUs: request them per node (`--gpus-per-node=4` or `--gres=gpu:4`), never per task:
# every rank sees all of its node's GPUs and hpcattn picks one by node-local rank, which keeps
# CUDA IPC between the node's GPUs working (--gpus-per-task / --gpu-bind=single break it).
#
# Every launch exports HPCATTN_EXPECT_RANKS = the rank count: hpcattn checks it against the MPI
# world size right after MPI init, so a launch that starts singletons fails loudly.

set -euo pipefail

hpcattn_find_home() {
    if [[ -n ${HPCATTN_HOME:-} ]]; then echo "$HPCATTN_HOME"; return; fi
    local script=""
    if [[ -n ${SLURM_JOB_ID:-} ]] && command -v scontrol >/dev/null; then
        script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | awk '/ Command=/{sub(/.*Command=/, ""); print $1; exit}')
    fi
    if [[ $script == */slurm/*.sbatch && -f ${script%/slurm/*}/slurm/common.sh ]]; then
        echo "${script%/slurm/*}"
    else
        echo "${SLURM_SUBMIT_DIR:-$PWD}"
    fi
}

HPCATTN_HOME=$(hpcattn_find_home)
if [[ -z ${HPCATTN_PYTHON:-} ]]; then
    if [[ -x $HPCATTN_HOME/.venv/bin/python ]]; then HPCATTN_PYTHON=$HPCATTN_HOME/.venv/bin/python
    else HPCATTN_PYTHON=$(command -v python3); fi
fi
HPCATTN_LAUNCHER=${HPCATTN_LAUNCHER:-srun}
# Open MPI: allow root in containers; PYTHONUNBUFFERED keeps rank output in order in the log
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
export PATH="$(dirname "$HPCATTN_PYTHON"):$PATH"
NTASKS=${SLURM_NTASKS:-1}

hpcattn_log() { echo "[hpcattn $(date -u +%H:%M:%S)] $*"; }

# hpcattn_launch P ARGS...: run `hpcattn ARGS` on P ranks with the chosen launcher
hpcattn_launch() {
    local ranks=$1; shift
    local -a pre
    case $HPCATTN_LAUNCHER in
    srun)    pre=(srun "--mpi=${HPCATTN_SRUN_MPI:-pmix}" "--ntasks=$ranks" --kill-on-bad-exit=1
                  ${HPCATTN_SRUN_FLAGS:-}) ;;
    mpiexec) pre=("$(dirname "$HPCATTN_PYTHON")/mpiexec" -n "$ranks" --bind-to none
                  ${HPCATTN_MPIEXEC_FLAGS:-}) ;;
    *) echo "hpcattn: error: HPCATTN_LAUNCHER=$HPCATTN_LAUNCHER: use srun or mpiexec" >&2; return 2 ;;
    esac
    hpcattn_log "${pre[*]} hpcattn $*"
    HPCATTN_EXPECT_RANKS=$ranks "${pre[@]}" ${HPCATTN_WRAP:-} "$HPCATTN_PYTHON" -m hpcattn "$@"
}

# hpcattn_serial ARGS...: one plain process in the batch step (gen, verify, sweep, plot)
hpcattn_serial() {
    hpcattn_log "hpcattn $*"
    "$HPCATTN_PYTHON" -m hpcattn "$@"
}

hpcattn_banner() {
    hpcattn_log "job ${SLURM_JOB_ID:-none} '${SLURM_JOB_NAME:-}' on ${SLURM_JOB_NUM_NODES:-1} node(s)" \
                "(${SLURM_JOB_NODELIST:-$(hostname)}), $NTASKS task(s), launcher $HPCATTN_LAUNCHER," \
                "home $HPCATTN_HOME, python $HPCATTN_PYTHON, cwd $PWD"
    # the same launch as the real run: proves the MPI wire-up (world size = task count) first
    HPCATTN_WRAP="" hpcattn_launch "$NTASKS" info
}

# a job file path as given, else relative to the checkout
hpcattn_job_path() {
    if [[ -f $1 ]]; then echo "$1"; elif [[ -f $HPCATTN_HOME/$1 ]]; then echo "$HPCATTN_HOME/$1"
    else echo "hpcattn: error: job file $1 not found (cwd $PWD, home $HPCATTN_HOME)" >&2; return 2; fi
}

# One run configured by the environment, or by a job file (HPCATTN_JOB) at ranks = task count.
#   HPCATTN_JOB          jobs/*.toml: `hpcattn sweep JOB --ranks $SLURM_NTASKS`; the rest is unused
#   HPCATTN_INPUT        input file (default runs/$SLURM_JOB_ID/in.h5, generated if missing)
#   HPCATTN_OUTPUT       output file (default runs/$SLURM_JOB_ID/out.h5)
#   HPCATTN_SEQ          N for the generated input (default 65536); HPCATTN_GEN_ARGS more gen flags
#                        (default "--heads 4 --kv-heads 2 --head-dim 64 --seed 1")
#   HPCATTN_MASK         (default causal+window:256); HPCATTN_VARIANT (default auto)
#   HPCATTN_RUN_ARGS     more run flags (e.g. --profile trace.json)
#   HPCATTN_VERIFY_ROWS  rows checked against float64 (default 256; 0: no verify)
hpcattn_single_run() {
    hpcattn_banner
    if [[ -n ${HPCATTN_JOB:-} ]]; then
        hpcattn_serial sweep "$(hpcattn_job_path "$HPCATTN_JOB")" --ranks "$NTASKS" --launcher "$HPCATTN_LAUNCHER"
        return
    fi
    local dir="runs/${SLURM_JOB_ID:-local}"
    local in=${HPCATTN_INPUT:-$dir/in.h5} out=${HPCATTN_OUTPUT:-$dir/out.h5}
    mkdir -p "$(dirname "$in")" "$(dirname "$out")"
    if [[ ! -f $in ]]; then
        hpcattn_serial gen "$in" --seq "${HPCATTN_SEQ:-65536}" ${HPCATTN_GEN_ARGS:---heads 4 --kv-heads 2 --head-dim 64 --seed 1}
    fi
    hpcattn_launch "$NTASKS" run "$in" "$out" --mask "${HPCATTN_MASK:-causal+window:256}" \
        --variant "${HPCATTN_VARIANT:-auto}" ${HPCATTN_RUN_ARGS:-}
    if [[ ${HPCATTN_VERIFY_ROWS:-256} != 0 ]]; then
        hpcattn_serial verify "$in" "$out" --rows "${HPCATTN_VERIFY_ROWS:-256}"
    fi
    hpcattn_log "done: $out"
}

# A sweep from a job file at the rank counts it lists (each at most the task count).
hpcattn_sweep_job() {
    hpcattn_banner
    local job
    job=$(hpcattn_job_path "${HPCATTN_JOB:-$1}")
    hpcattn_serial sweep "$job" --launcher "$HPCATTN_LAUNCHER" --plot ${HPCATTN_SWEEP_ARGS:-}
}
