# What the one-node (slurm/local) and N-node (slurm/cluster) test clusters share; sourced, not run.

alive() {  # alive <pidfile> <command name>: the pid file names a live <command>
  [[ -s $1 ]] && [[ $(cat "/proc/$(cat "$1")/comm" 2>/dev/null) == "$2" ]]
}

stopping=()
signal_daemon() {  # signal_daemon <pidfile> <name>: TERM the daemon the pid file names, if alive
  local pid
  if alive "$1" "$2"; then
    pid="$(cat "$1")"  # read once: daemons delete it as they exit
    kill -TERM "$pid"
    stopping+=("$2:$pid")
  fi
  rm -f "$1"
}

wait_stopped() {  # wait_stopped <label>: wait for every daemon signalled; KILL one that ignores TERM for 15 s
  local entry name pid
  for entry in "${stopping[@]}"; do
    name="${entry%%:*}" pid="${entry##*:}"
    for _ in $(seq 150); do
      [[ -d /proc/$pid ]] || break
      sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
      echo "$1: $name ($pid) ignored TERM for 15 s, killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "$1: stopped $name ($pid)"
  done
  stopping=()
}

slurm_conf_common() {  # slurm_conf_common <state folder>: the slurm.conf lines both clusters share
  cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MailProg=/bin/true
# As on many clusters, srun starts no MPI plugin unless asked: the templates must pass --mpi (SRUN_MPI).
MpiDefault=none
# No cgroups in containers: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# Nodes claim the CPUs slurm.conf gives them whatever the machine has, so tests can ask for more tasks.
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Schedule a batch job at once, not within the default 3 s: tests wait less.
SchedulerParameters=batch_sched_delay=0
# Keep finished jobs visible to scontrol (no slurmdbd, so no sacct) and log them.
MinJobAge=3600
JobCompType=jobcomp/filetxt
JobCompLoc=$1/jobcomp.txt
JobRequeue=1
KillWait=5
ReturnToService=2
StateSaveLocation=$1/ctld
SlurmctldPidFile=$1/slurmctld.pid
SlurmctldLogFile=$1/slurmctld.log
CONF
}
