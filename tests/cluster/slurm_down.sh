#!/usr/bin/env bash
# Stop the test cluster started by slurm_up.sh and remove its state dir.
#
# Stops exactly the daemons whose pids slurm_up.sh's daemons recorded under the state dir
# (checking each pid still runs the expected program), never anything found by name.
# Env: PANOBENCH_SLURM_DIR  state dir (default /tmp/panobench-slurm)
set -euo pipefail

STATE="${PANOBENCH_SLURM_DIR:-/tmp/panobench-slurm}"
say() { echo "slurm_down: $*" >&2; }

if [[ ! -e "$STATE" ]]; then
    say "nothing to do: $STATE does not exist"
    exit 0
fi
if [[ ! -f "$STATE/.panobench-slurm" ]]; then
    say "ERROR: $STATE was not created by slurm_up.sh (no marker file); refusing to touch it"
    exit 1
fi

pid_of() {  # pid_of <pidfile> <comm>: prints the pid if it still runs the expected program
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(cat "$1")"
    [[ -r "/proc/$pid/comm" && "$(cat "/proc/$pid/comm")" == "$2" ]] && echo "$pid"
}

# Cancel jobs still in this cluster so slurmd does not leave job steps behind.
if pid_of "$STATE/run/slurmctld.pid" slurmctld >/dev/null; then
    SLURM_CONF="$STATE/etc/slurm.conf" timeout 10 scancel --partition=ci 2>/dev/null || true
fi

# Order matters: slurmd before slurmctld (clean node shutdown), munged last (both need it).
for entry in slurmd:slurmd slurmctld:slurmctld munged:munged; do
    name="${entry%%:*}"
    comm="${entry##*:}"
    pid="$(pid_of "$STATE/run/$name.pid" "$comm")" || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        [[ -d "/proc/$pid" ]] || break
        sleep 0.2
    done
    if [[ -d "/proc/$pid" ]]; then
        say "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped $name ($pid)"
done

# slurm_up.sh links the default config path to its config (jobs' nested srun needs it); only our link goes.
if [[ -L /etc/slurm/slurm.conf && "$(readlink /etc/slurm/slurm.conf)" == "$STATE/etc/slurm.conf" ]]; then
    rm -f /etc/slurm/slurm.conf
    say "removed /etc/slurm/slurm.conf -> $STATE/etc/slurm.conf"
fi

rm -rf -- "$STATE"
say "removed $STATE"
