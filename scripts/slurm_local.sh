#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the SLURM tests (tests/test_launchers.py -m slurm):
# Debian's slurm-wlm (slurmctld + slurmd) with munge, a minimal slurm.conf for localhost with this
# machine's CPUs and memory, no cgroups (proctrack/linuxproc, task/none: works in containers).
# Needs root (CI runs as root). Everything lives under $LDM_SLURM_DIR (default /tmp/ldm-slurm);
# clients find the cluster through SLURM_CONF:
#
#   bash scripts/slurm_local.sh start     # install if missing, write the config, start the daemons
#   export SLURM_CONF=/tmp/ldm-slurm/slurm.conf
#   sinfo; sbatch ...; srun ...
#   bash scripts/slurm_local.sh stop      # stop the daemons (the config and logs stay)
set -euo pipefail
DIR=${LDM_SLURM_DIR:-/tmp/ldm-slurm}
CONF=$DIR/slurm.conf
ACTION=${1:-start}

pidof_file() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
  for daemon in slurmd slurmctld munged; do
    if pidof_file "$DIR/$daemon.pid"; then kill "$(cat "$DIR/$daemon.pid")"; fi
  done
  # wait until they are gone, at most 20 s
  for _ in $(seq 20); do
    pidof_file "$DIR/slurmd.pid" || pidof_file "$DIR/slurmctld.pid" || pidof_file "$DIR/munged.pid" || return 0
    sleep 1
  done
  echo "slurm_local: daemons still running after 20 s" >&2
  return 1
}

if [ "$ACTION" = stop ]; then stop; exit 0; fi
if [ "$ACTION" != start ]; then echo "usage: $0 start|stop" >&2; exit 2; fi
if [ "$(id -u)" != 0 ]; then echo "slurm_local: needs root (slurmd starts jobs as their users)" >&2; exit 1; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$DIR"/{state,spool,munge,log}
stop >/dev/null 2>&1 || true

# munge: a key of our own, socket and state under $DIR
if [ ! -s "$DIR/munge/munge.key" ]; then
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 700 "$DIR/munge"; chmod 400 "$DIR/munge/munge.key"
SOCKET=$DIR/munge/munge.socket
munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/munged.pid" \
  --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))   # leave 1 GB to the system
cat > "$CONF" <<EOF
# Written by scripts/slurm_local.sh: one node, this machine.
ClusterName=ldm-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# no cgroups: containers rarely let slurmd manage them
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
# pre-emption as SLURM does it: requeued jobs start again at once
JobRequeue=1
KillWait=30
MinJobAge=300
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

slurmctld -f "$CONF"
slurmd -f "$CONF"
export SLURM_CONF=$CONF
for _ in $(seq 30); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm_local: node $HOST up ($CPUS CPUs, $MEM_MB MB); export SLURM_CONF=$CONF"
    exit 0
  fi
  sleep 1
done
echo "slurm_local: the node did not come up in 30 s; sinfo says:" >&2
sinfo >&2 || true
tail -20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
exit 1
