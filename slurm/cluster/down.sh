#!/usr/bin/env bash
# Stop the cluster of up.sh: cancel its jobs, stop its daemons (by pid), end every
# process left in a node, then remove the namespaces, links, bridge and /etc/netns
# entries. Idempotent. Kept state (finished jobs, job ids) stays in the state folder.
# HPCDL_CLUSTER_KEEP_NETWORK=1 (used by up.sh on a config change) keeps the network.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"
export SLURM_CONF="$state/slurm.conf"

if alive "$state/slurmctld.pid" slurmctld && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
  scancel $(squeue -h -o %i) 2>/dev/null || true
  for _ in $(seq 30); do
    [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
    sleep 0.5
  done
fi

for pidfile in "$state"/slurmd-node*.pid; do
  [[ -e $pidfile ]] && signal_daemon "$pidfile" slurmd
done
signal_daemon "$state/slurmctld.pid" slurmctld
signal_daemon "$state/munged.pid" munged
wait_stopped cluster-down

# Anything still inside a node (a step whose slurmstepd died, a process started by on.sh) ends too.
for ns in $(ip netns list 2>/dev/null | awk '/^node[0-9]+/ {print $1}'); do
  pids="$(ip netns pids "$ns" 2>/dev/null || true)"
  if [[ -n $pids ]]; then
    kill -KILL $pids 2>/dev/null || true
    echo "cluster-down: ended $(wc -w <<<"$pids") process(es) left on $ns"
  fi
done
[[ -n ${HPCDL_CLUSTER_KEEP_NETWORK:-} ]] && exit 0

for ns in $(ip netns list 2>/dev/null | awk '/^node[0-9]+/ {print $1}'); do
  for _ in $(seq 50); do  # killed processes leave the namespace as they are reaped
    [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && break
    sleep 0.1
  done
  ip netns delete "$ns"
  rm -rf "/etc/netns/$ns"
done
for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep "^$veth_prefix[0-9]" || true); do
  ip link delete "$link" 2>/dev/null || true
done
ip link delete "$bridge" 2>/dev/null || true
rmdir /etc/netns 2>/dev/null || true
echo "cluster-down: no daemon, namespace or link of the cluster is left"
