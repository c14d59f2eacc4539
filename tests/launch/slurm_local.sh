#!/usr/bin/env bash
# A real single-host SLURM cluster (Debian 12: SLURM 22.05 + munge) on this machine, for the
# launch/slurm.sbatch checks. Idempotent: installs the packages if
# missing, writes /etc/slurm/slurm.conf (this host's real CPUs / RealMemory from `slurmd -C`),
# starts munged, slurmctld and slurmd if they are not running (no systemd here: plain
# daemons, logs in /var/log/slurm/), waits for the node to be idle and prints `sinfo`.
# Must run as root. Exit 0 when `srun -N1 hostname` works.
#
# What this container needs (gVisor sandbox, no systemd, cgroup v1 only partly delegated):
#   ProctrackType=proctrack/linuxproc + TaskPlugin=task/none + no JobAcctGather: no cgroups;
#   CommunicationParameters=NoCtldInAddrAny,NoInAddrAny + NodeAddr/SlurmctldHost 127.0.0.1:
#   slurmctld, slurmd and srun bind 127.0.0.1 only (the default is every interface);
#   AccountingStorageType=none (no slurmdbd: `sacct` does not work; finished jobs stay in
#   `scontrol show job` for MinJobAge=3600 s, and jobcomp/filetxt logs every end to
#   /var/log/slurm/jobcomp.log, one line per run, requeues included);
#   GresTypes=gpu with no GPU on the node, so `--gpus-per-node=0` is a valid request;
#   SchedulerParameters=sched_interval=5: a requeued job (held ~120 s, Reason=BeginTime, by
#   slurmctld itself) starts within 5 s of becoming eligible instead of up to 60 s later.
# Re-running with a changed slurm.conf restarts the daemons it started (pid files).
# `tests/launch/slurm_local.sh stop` stops slurmd, slurmctld and munged (pid files; the
# packages, the key and slurm.conf stay: starting again is quick). The tests start the
# cluster when it is not running and stop, at the end of the session, what they started.
set -u
log() { echo "slurm-local: $*" >&2; }
if [ "${1:-}" = stop ]; then
  for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    pid=$(cat "$f" 2>/dev/null)
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
      log "stopped $(basename "$f" .pid) ($pid)"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  exit 0
fi
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
export DEBIAN_FRONTEND=noninteractive

# ---- 1. packages
. "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh"
apt_install /tmp/slurm-local-apt.log munge slurmctld slurmd slurm-client

# ---- 2. munge: a key, then munged as the munge user
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! alive /run/munge/munged.pid; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged || { log "munged failed to start"; exit 1; }
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null 2>&1 || { log "munge credentials do not round-trip"; exit 1; }

# ---- 3. slurm.conf: one node = this host, with what slurmd detects
host=$(hostname -s)
nodeline=$(slurmd -C 2>/dev/null | head -n 1)   # NodeName=H CPUs=.. Boards=.. ... RealMemory=..
case "$nodeline" in NodeName=*) ;; *) log "slurmd -C failed: $nodeline"; exit 1;; esac
if ! getent hosts "$host" >/dev/null; then echo "127.0.0.1 $host" >> /etc/hosts; fi
install -d -m 0755 /etc/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd
new=$(mktemp)
cat > "$new" <<EOF
# written by tests/launch/slurm_local.sh: a single-host cluster on 127.0.0.1
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
GresTypes=gpu
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=30
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
MailProg=/bin/true
$nodeline NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
if ! cmp -s "$new" /etc/slurm/slurm.conf; then
  log "writing /etc/slurm/slurm.conf"; cp "$new" /etc/slurm/slurm.conf; chmod 0644 /etc/slurm/slurm.conf; changed=1
fi
rm -f "$new"
if [ "$changed" = 1 ]; then   # restart what runs with the old configuration (our own pid files only)
  for d in slurmd slurmctld; do
    if alive /run/$d.pid; then
      pid=$(cat /run/$d.pid); log "stopping $d ($pid): configuration changed"; kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
fi

# ---- 4. daemons (each forks into the background and writes its pid file)
if ! alive /run/slurmctld.pid; then
  log "starting slurmctld (log /var/log/slurm/slurmctld.log)"
  /usr/sbin/slurmctld || { tail -5 /var/log/slurm/slurmctld.log; log "slurmctld failed"; exit 1; }
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || { tail -5 /var/log/slurm/slurmctld.log; log "slurmctld does not answer"; exit 1; }
if ! alive /run/slurmd.pid; then
  log "starting slurmd (log /var/log/slurm/slurmd.log)"
  /usr/sbin/slurmd || { tail -5 /var/log/slurm/slurmd.log; log "slurmd failed"; exit 1; }
fi

# ---- 5. the node idle (or busy with jobs), then a one-task step
for _ in $(seq 150); do
  st=$(sinfo -h -n "$host" -o %T 2>/dev/null)
  case "$st" in idle|mixed|allocated|completing) break;; esac
  case "$st" in drain*|down*) scontrol update nodename="$host" state=resume 2>/dev/null;; esac
  sleep 0.2
done
sinfo
case "$st" in idle|mixed|allocated|completing) ;; *) log "node $host is '$st'"; exit 1;; esac
if [ "$st" = idle ]; then
  out=$(timeout 60 srun -N1 -t 1 hostname 2>&1) || { echo "$out"; log "srun -N1 hostname failed"; exit 1; }
  [ "$out" = "$(hostname)" ] || { echo "$out"; log "srun -N1 hostname printed something else"; exit 1; }
fi
log "ok: $(sinfo -V), node $host $(scontrol show node "$host" | grep -o 'CPUTot=[0-9]*') $(scontrol show node "$host" | grep -o 'RealMemory=[0-9]*')"
