#!/usr/bin/env bash
# Run a command on a node of the cluster of up.sh, as a job step would see it:
# the node's network, hostname and /etc/hosts.   slurm/cluster/on.sh node2 hostname -I
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"
node="${1:?usage: on.sh NODE COMMAND...}"
shift
alive "$state/slurmd-$node.pid" slurmd || die "$node is not up (slurm/cluster/up.sh)"
# Enter the slurmd's namespaces (network, UTS, mounts), so the hostname is the node's.
exec nsenter --target "$(cat "$state/slurmd-$node.pid")" --net --uts --mount -- "$@"
