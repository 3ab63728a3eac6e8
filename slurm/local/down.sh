#!/usr/bin/env bash
# Stop the one-node cluster started by up.sh: cancel its jobs, then stop the
# daemons named by the pid files in the state folder (munged only if up.sh
# started it). Idempotent; kept state (finished jobs, job ids) stays on disk.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${HPCDL_SLURM_DIR:-$(cd "$here/../.." && pwd)/.slurm}"
export SLURM_CONF="$state/slurm.conf"

# shellcheck source=../common.sh
source "$here/../common.sh"

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
signal_daemon "$state/slurmd.pid" slurmd
signal_daemon "$state/slurmctld.pid" slurmctld
# up.sh writes munged.pid only when it started munged itself.
[[ -n ${HPCDL_SLURM_KEEP_MUNGE:-} ]] || signal_daemon "$state/munged.pid" munged
wait_stopped slurm-down
