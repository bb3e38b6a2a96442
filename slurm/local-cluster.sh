#!/usr/bin/env bash
# Start (or stop) a real one-node SLURM cluster on this machine, for tests and for trying the
# batch scripts: munged, slurmctld and slurmd with a private slurm.conf naming this host.
#
#   slurm/local-cluster.sh start [--install]   # prints `export SLURM_CONF=...` on its last line
#   slurm/local-cluster.sh stop
#   slurm/local-cluster.sh status
#
# Needs root (daemons run as root) and the test-slurm packages of system-packages.txt (`slurm-wlm`,
# `munge`, `libpmix-dev`; `--install` runs scripts/system-deps.sh test-slurm, which apt-installs
# the missing ones). State, logs and the config live in $HPCATTN_SLURM_DIR (default
# /tmp/hpcattn-slurm); nothing under /etc is changed except munge's key, which the munge package
# creates. The node advertises $HPCATTN_SLURM_CPUS CPUs (default 8, more than a small CI machine
# has: SlurmdParameters=config_overrides) so 4-rank jobs fit on a 2-core machine.
# Exit status: 0 when the node is idle and accepts jobs; 3 when SLURM is not installed (and
# --install was not given or failed); 4 when `srun --mpi=pmix` cannot load the PMIx library
# (libpmix.so, from libpmix-dev; the cluster is stopped again); 1 on any other failure, with the
# daemon logs printed.
set -euo pipefail
DIR=${HPCATTN_SLURM_DIR:-/tmp/hpcattn-slurm}
CPUS=${HPCATTN_SLURM_CPUS:-8}
NODES=${HPCATTN_SLURM_NODES:-1}   # >1: that many slurmd on this host (node1..nodeK), a multi-node test bed
HOST=$(hostname -s)
CONF=$DIR/slurm.conf
action=${1:-start}
install=0
[[ "${2:-}" == "--install" ]] && install=1

log() { echo "local-cluster: $*" >&2; }

stop() {
    for pidfile in "$DIR"/slurmd*.pid "$DIR"/slurmctld.pid; do
        if [[ -f $pidfile ]]; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null && log "stopped $(basename "$pidfile" .pid) ($pid)" || true
            rm -f "$pidfile"
        fi
    done
    sleep 1
    if [[ -f $DIR/munged.pid ]]; then
        kill "$(cat "$DIR/munged.pid")" 2>/dev/null && log "stopped munged" || true
        rm -f "$DIR/munged.pid"
    fi
}

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
               && command -v munged >/dev/null; }

case $action in
stop) stop; exit 0 ;;
status) SLURM_CONF=$CONF sinfo -N -l; exit ;;
start) ;;
*) echo "usage: $0 start [--install] | stop | status" >&2; exit 2 ;;
esac

if (( install )); then   # the list's test-slurm packages; a failed install ends below (exit 3 or 4)
    "$(dirname "$0")/../scripts/system-deps.sh" test-slurm >&2 || true
fi
if ! have_slurm; then
    log "SLURM (slurmctld, slurmd, sbatch, munged) is not installed"
    exit 3
fi
[[ $(id -u) == 0 ]] || { log "must run as root"; exit 1; }

stop
mkdir -p "$DIR"/{spool,state,log}
for i in $HOST $(seq -f "node%g" 1 "$NODES"); do mkdir -p "$DIR/tmp/$i" "$DIR/spool/slurmd-$i"; done
# munge: the package's key; a private socket so a system munged (if any) is left alone.
[[ -s /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
SOCKET=$DIR/munge.socket
# munged refuses to run as root unless forced; as the munge user it needs a directory it owns
chown munge:munge "$DIR" 2>/dev/null || true
munged --force --socket="$SOCKET" --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munged.seed" 2>>"$DIR/log/munged.log"
chown root:root "$DIR"

NODE=$(slurmd -C | head -1 | sed -E "s/CPUs=[0-9]+/CPUs=$CPUS/; s/CoresPerSocket=[0-9]+/CoresPerSocket=$CPUS/; s/RealMemory=([0-9]+)/RealMemory=1000/")
if (( NODES > 1 )); then   # node1..nodeK, all on this host, one slurmd each on its own port
    NODELIST="node[1-$NODES]"
    base=${HPCATTN_SLURMD_PORT:-6818}
    NODE=$(echo "$NODE" | sed -E "s/^NodeName=[^ ]+/NodeName=$NODELIST NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[$base-$((base + NODES - 1))]/")
else
    NODELIST=$HOST
fi
cat > "$CONF" <<CONF
# written by hpcattn slurm/local-cluster.sh
ClusterName=hpcattn-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
LaunchParameters=use_interactive_step
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
# per-node job scratch: the pmix plugin puts each step's client directory here; on one host,
# several slurmd would collide in /tmp without it
TmpFS=$DIR/tmp/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPort=${HPCATTN_SLURMCTLD_PORT:-6817}
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
ReturnToService=2
$NODE State=UNKNOWN
PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
export SLURM_CONF=$CONF
slurmctld -f "$CONF" -i   # -i: ignore (clear) old state
if (( NODES > 1 )); then
    for i in $(seq "$NODES"); do slurmd -f "$CONF" -N "node$i"; done
else
    slurmd -f "$CONF"
fi
for _ in $(seq 60); do
    state=$(sinfo -h -o %T 2>/dev/null | sort -u | tr '\n' ' ' || true)
    [[ $state == "idle " ]] && break
    sleep 1
done
if [[ ${state:-} != "idle " ]]; then
    log "node did not become idle (state '${state:-none}'); logs follow"
    tail -n 30 "$DIR"/log/*.log >&2 || true
    exit 1
fi
# srun --mpi=pmix (MpiDefault, and the batch scripts' default) needs Slurm's mpi/pmix plugin, which
# loads libpmix.so when a step starts: `srun --mpi=list` names pmix even when that fails, so a
# one-task step checks it
if ! out=$(timeout 60 srun --mpi=pmix --ntasks=1 true 2>&1); then
    if grep -q "PMIx library\|Invalid MPI type 'pmix'" <<<"$out"; then
        log "srun --mpi=pmix fails: Slurm's mpi/pmix plugin loads libpmix.so, which Debian's" \
            "libpmix-dev installs (libpmix2 alone is not enough): apt-get install libpmix-dev"
        echo "$out" >&2
        stop
        exit 4
    fi
    log "a one-task srun step failed; its output and the logs follow"
    echo "$out" >&2
    tail -n 30 "$DIR"/log/*.log >&2 || true
    exit 1
fi
log "cluster up: $NODES node(s) ($NODELIST) idle with $CPUS CPUs each; logs in $DIR/log"
echo "export SLURM_CONF=$CONF"
