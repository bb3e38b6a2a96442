#!/usr/bin/env bash
# Install the Debian packages that make targets need, from the one list system-packages.txt.
#
#   scripts/system-deps.sh [TARGET...]   # TARGET: test-slurm, test-phdf5 (none: every package)
#
# As root with apt-get it apt-installs the listed packages that dpkg-query does not report as
# installed, and nothing else; when all are there it says so and returns at once. Otherwise
# (not root, no apt-get, not Debian) it names the missing packages and what each target will do
# without them, and exits 0: the targets check for what they run themselves.
# Exit status: 0; 1 when apt-get failed; 2 on an unknown target.
set -euo pipefail
LIST=$(cd "$(dirname "$0")/.." && pwd)/system-packages.txt

log() { echo "system-deps: $*" >&2; }

# what a target does when its packages are missing
without() {
    case $1 in
    test-slurm) echo "make test-slurm skips the SLURM tests (SKIPPED banner) without SLURM or root;" \
                     "with SLURM but no libpmix-dev, slurm/local-cluster.sh start fails (exit 4: srun has no pmix)" ;;
    test-phdf5) echo "make test-phdf5 stops before building .venv-phdf5 (no mpicc or no pkg-config hdf5-openmpi)" ;;
    esac
}

# the list: "package target[,target] # why"; collect the packages of the targets asked for
known=() pkgs=()
declare -A needed_by
while read -r pkg targets _; do
    [[ -z $pkg || $pkg == \#* ]] && continue
    IFS=, read -ra ts <<<"$targets"
    known+=("${ts[@]}")
    needed_by[$pkg]=${ts[*]}
    for t in "${ts[@]}"; do
        if (( $# == 0 )) || [[ " $* " == *" $t "* ]]; then pkgs+=("$pkg"); break; fi
    done
done <"$LIST"
for t in "$@"; do
    [[ " ${known[*]} " == *" $t "* ]] || { log "unknown target '$t' (the list names: $(printf '%s\n' "${known[@]}" | sort -u | xargs))"; exit 2; }
done
targets=${*:-$(printf '%s\n' "${known[@]}" | sort -u | xargs)}

if ! command -v dpkg-query >/dev/null; then
    log "not a Debian system (no dpkg-query): $targets need ${pkgs[*]} or their equivalents"
    exit 0
fi
missing=()
for pkg in "${pkgs[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) == installed ]] || missing+=("$pkg")
done
if (( ${#missing[@]} == 0 )); then
    log "all ${#pkgs[@]} packages for $targets are installed (${pkgs[*]})"
    exit 0
fi
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    log "missing for $targets: ${missing[*]}; install as root: apt-get install ${missing[*]}"
    for t in $(for pkg in "${missing[@]}"; do tr ' ' '\n' <<<"${needed_by[$pkg]}"; done | sort -u); do
        [[ " $targets " == *" $t "* ]] && log "without them, $(without "$t")"
    done
    exit 0
fi
log "apt-get install ${missing[*]} (for $targets)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q "${missing[@]}"; }; then log "apt-get failed"; exit 1; fi
