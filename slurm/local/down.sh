#!/usr/bin/env bash
# Stop the one-node cluster started by up.sh: cancel its jobs, then stop the
# daemons named by the pid files in the state folder (munged only if up.sh
# started it). Idempotent; kept state (finished jobs, job ids) stays on disk.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${HPCDL_SLURM_DIR:-$(cd "$here/../.." && pwd)/.slurm}"
export SLURM_CONF="$state/slurm.conf"

alive() {  # alive <pidfile> <command name>: the pid file names a live <command>
  [[ -s $1 ]] && [[ $(cat "/proc/$(cat "$1")/comm" 2>/dev/null) == "$2" ]]
}

# Jobs first, while the controller can still end them: their slurmstepd
# processes would otherwise outlive slurmd.
if alive "$state/slurmctld.pid" slurmctld && alive "$state/slurmd.pid" slurmd; then
  if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
    scancel $(squeue -h -o %i) 2>/dev/null || true
    for _ in $(seq 30); do
      [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.5
    done
  fi
fi

# TERM every daemon first, then wait: each takes about 2 s to exit.
stopping=()
signal() {  # signal <name>: TERM the daemon its pid file names, if it is alive
  local pid
  if alive "$state/$1.pid" "$1"; then
    pid="$(cat "$state/$1.pid")"  # read once: daemons delete it as they exit
    kill -TERM "$pid"
    stopping+=("$1:$pid")
  fi
  rm -f "$state/$1.pid"
}
signal slurmd
signal slurmctld
# up.sh writes munged.pid only when it started munged itself.
[[ -n ${HPCDL_SLURM_KEEP_MUNGE:-} ]] || signal munged

for entry in "${stopping[@]}"; do
  name="${entry%%:*}" pid="${entry##*:}"
  for _ in $(seq 150); do
    [[ -d /proc/$pid ]] || break
    sleep 0.1
  done
  if [[ -d /proc/$pid ]]; then
    echo "slurm-down: $name ($pid) ignored TERM for 15 s, killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  echo "slurm-down: stopped $name ($pid)"
done
