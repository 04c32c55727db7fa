#!/usr/bin/env bash
# A one-node Slurm cluster for tests and demos, started by hand (no systemd).
#
#   tests/slurm/cluster.sh start    install slurm-wlm + munge if missing (root, apt),
#                                   write the config under $STATE, start munged,
#                                   slurmctld and slurmd, wait until the node is idle
#   tests/slurm/cluster.sh stop     stop the three daemons by PID (from their pid files)
#   tests/slurm/cluster.sh status   show what runs; exit 0 when the node answers
#   tests/slurm/cluster.sh env      print `export SLURM_CONF=...` for your shell
#
# Everything lives under STATE (env MT_SLURM_STATE, default /tmp/mpitrain-slurm):
# slurm.conf, cgroup.conf, the munge key and socket, spool, state, logs, pid files.
# Nothing is written to /etc.  Clients need SLURM_CONF=$STATE/slurm.conf:
#   eval "$(tests/slurm/cluster.sh env)"; sinfo
#
# Config: proctrack/linuxproc, task/none, select/cons_tres CR_CPU, one partition
# "debug" (default) with OverSubscribe=YES, JobRequeue=1, MPI default pmi2.
# Ports: MT_SLURM_CTLD_PORT (6817), MT_SLURM_D_PORT (6818).
set -euo pipefail

STATE=${MT_SLURM_STATE:-/tmp/mpitrain-slurm}
CTLD_PORT=${MT_SLURM_CTLD_PORT:-6817}
D_PORT=${MT_SLURM_D_PORT:-6818}
START_TIMEOUT=${MT_SLURM_START_TIMEOUT:-60}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

find_bin() {  # daemons live in /usr/sbin, which may be off PATH
  local b
  for b in "$(command -v "$1" 2>/dev/null || true)" "/usr/sbin/$1" "/usr/bin/$1"; do
    [ -n "$b" ] && [ -x "$b" ] && { echo "$b"; return 0; }
  done
  return 1
}

install_missing() {
  local missing=()
  find_bin slurmctld >/dev/null || missing+=(slurm-wlm)
  find_bin munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "not root and ${missing[*]} not installed: cannot install (apt-get install ${missing[*]})"
  command -v apt-get >/dev/null || die "${missing[*]} not installed and no apt-get to install it"
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine needs the package lists first; a failed update is not fatal
  # when the lists are already there.
  apt-get update -q >"$STATE/apt.log" 2>&1 || log "apt-get update failed (see $STATE/apt.log); trying install anyway"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$STATE/apt.log" 2>&1 \
    || die "apt-get install ${missing[*]} failed (see $STATE/apt.log)"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
  local host nodeline user
  host=$(hostname -s)
  user=$(id -un)
  # Real hardware line (CPUs, sockets, cores, threads, memory) from slurmd itself.
  nodeline=$("$SLURMD" -C 2>/dev/null | head -1 | sed -E 's/[[:space:]]*UpTime=.*//')
  [ -n "$nodeline" ] || nodeline="NodeName=$host CPUs=$(nproc)"
  mkdir -p "$STATE"/{spool,ctld,log,run,munge}
  # Job ids must not repeat across restarts of this cluster: MPICH under srun names its
  # shared memory after JOBID.STEPID, and a segment leaked by an aborted run of an earlier
  # cluster's job with the same id breaks MPI_Init of the new one.  Continue from the last
  # id seen (saved at stop), else start from a clock-derived id.
  local first
  first=$(cat "$STATE/next_job_id" 2>/dev/null || true)
  [ -n "$first" ] || first=$(( ($(date +%s) % 1000000) * 50 + 1 ))
  cat >"$CONF" <<CONF
# One-node test cluster written by tests/slurm/cluster.sh -- not for production.
ClusterName=mpitrain
FirstJobId=$first
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$user
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a node remembers a job's revoked credentials, which is also how long
# Slurm holds a requeued job (default 120 s); a requeued job released before that is killed
# at launch ("Job credential revoked").  Short here, so the preemption test waits seconds.
AuthInfo=socket=$STATE/munge/munge.socket.2,cred_expire=15
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/slurmd-%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmi2
ReturnToService=2
SlurmdParameters=config_overrides
# Requeue: node failures requeue batch jobs; scontrol requeue works on them.
JobRequeue=1
# Keep finished jobs visible to scontrol/squeue for a while (no accounting db).
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
$nodeline NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  # Read only by cgroup plugins; present so no /etc/slurm/cgroup.conf is consulted.
  cat >"$STATE/cgroup.conf" <<CONF
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
CONF
}

start_munge() {
  local key=$STATE/munge/munge.key pidf=$STATE/munge/munged.pid
  if pid_alive "$pidf"; then return 0; fi
  if [ ! -s "$key" ]; then
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
  fi
  chmod 700 "$STATE/munge"; chmod 400 "$key"
  "$MUNGED" --force --key-file="$key" --socket="$STATE/munge/munge.socket.2" \
    --pid-file="$pidf" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed" \
    || die "munged did not start (see $STATE/log/munged.log)"
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -1; }

cmd_start() {
  mkdir -p "$STATE"
  install_missing
  SLURMCTLD=$(find_bin slurmctld) || die "slurmctld not found"
  SLURMD=$(find_bin slurmd) || die "slurmd not found"
  MUNGED=$(find_bin munged) || die "munged not found"
  command -v sinfo >/dev/null || die "sinfo not on PATH"
  if pid_alive "$STATE/run/slurmctld.pid" && pid_alive "$STATE/run/slurmd.pid"; then
    log "already running (state $STATE)"
  else
    cmd_stop quiet || true
    write_config
    start_munge
    # -c: clear old job state (a test cluster starts empty).
    "$SLURMCTLD" -c -f "$CONF" || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
    "$SLURMD" -f "$CONF" || die "slurmd did not start (see $STATE/log/slurmd.log)"
  fi
  local t0=$SECONDS st=""
  while :; do
    st=$(node_state || true)
    case "$st" in idle*|mixed*|allocated*) break ;; esac
    if [ "$st" = "down" ] || [ "$st" = "drained" ] || [ "$st" = "down*" ]; then
      scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    fi
    if [ $((SECONDS - t0)) -ge "$START_TIMEOUT" ]; then
      log "node not idle after ${START_TIMEOUT}s (state '${st:-no answer}'); last log lines:"
      tail -n 5 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.5
  done
  log "node $(hostname -s) $st after $((SECONDS - t0))s; export SLURM_CONF=$CONF"
}

stop_pidfile() {  # name pidfile
  local pidf=$2 pid
  [ -s "$pidf" ] || return 0
  pid=$(cat "$pidf")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$1 ($pid) ignored SIGTERM for 10s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pidf"
}

cmd_stop() {
  # Jobs first, so no slurmstepd is left behind.
  if [ -s "$STATE/run/slurmctld.pid" ] && pid_alive "$STATE/run/slurmctld.pid"; then
    local last
    last=$(timeout 10 scontrol show job -o 2>/dev/null | grep -o '^JobId=[0-9]*' | cut -d= -f2 | sort -n | tail -1 || true)
    [ -n "$last" ] && echo $((last + 1)) >"$STATE/next_job_id"
    timeout 10 scancel --full --quiet --state=RUNNING,PENDING --partition=debug >/dev/null 2>&1 || true
  fi
  stop_pidfile slurmd "$STATE/run/slurmd.pid"
  stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
  stop_pidfile munged "$STATE/munge/munged.pid"
  [ "${1:-}" = quiet ] || log "stopped (state kept in $STATE)"
}

cmd_status() {
  local n rc=0
  for n in slurmctld:run/slurmctld.pid slurmd:run/slurmd.pid munged:munge/munged.pid; do
    if pid_alive "$STATE/${n#*:}"; then echo "${n%%:*}: running (pid $(cat "$STATE/${n#*:}"))"
    else echo "${n%%:*}: not running"; rc=1; fi
  done
  if [ $rc -eq 0 ]; then sinfo -N || rc=1; fi
  echo "SLURM_CONF=$CONF"
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
