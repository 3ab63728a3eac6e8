# Names and helpers shared by up.sh, down.sh and on.sh (sourced, not run).
repo="$(cd "$here/../.." && pwd)"
state="${HPCDL_CLUSTER_DIR:-$repo/.cluster}"
bridge=hpcdl-br0          # the cluster's switch; exists only on this machine
veth_prefix=hpcdl-n       # hpcdl-n1 is node1's cable, bridge side
subnet=10.231.0           # a private /24 no real network here uses
head_addr=$subnet.254     # slurmctld and munged listen here (the bridge)
ctld_port=6917
slurmd_port=6918
munge_socket="$state/munge/munge.socket"
boot_id=/proc/sys/kernel/random/boot_id

# shellcheck source=../common.sh
source "$here/../common.sh"

die() { echo "cluster: $*" >&2; exit 1; }

node_addr() { echo "$subnet.$1"; }

any_alive() {  # any daemon of this cluster still running
  local pidfile
  for pidfile in "$state"/slurmctld.pid "$state"/slurmd-node*.pid "$state"/munged.pid; do
    [[ -e $pidfile ]] || continue
    alive "$pidfile" "$(basename "$pidfile" .pid | sed 's/-node.*//')" && return 0
  done
  return 1
}

tbf_burst() {  # tbf_burst <rate>: 0.1 ms of traffic, at least 4 KiB (more than a packet)
  # A small bucket: a large one lets each message of a ping-pong through at full speed after the idle
  # round trip refills it, and the link looks faster than its rate.
  local value="${1%bit}" scale=1
  case ${value: -1} in
    k) scale=1000 value="${value%k}" ;;
    m) scale=1000000 value="${value%m}" ;;
    g) scale=1000000000 value="${value%g}" ;;
  esac
  awk "BEGIN{b = int($value * $scale / 8 / 10000); print (b < 4096 ? 4096 : b)}"
}
