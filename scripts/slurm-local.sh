#!/usr/bin/env bash
# btm's test cluster (adapted from the project's shared recipe).
# Start a real single-node Slurm cluster on this machine (root, no systemd): munge, slurmctld,
# slurmd, and slurmrestd on 127.0.0.1:${SLURMRESTD_PORT:-6820} with JWT auth. Debian 12 packages,
# Slurm 22.05 (REST API version v0.0.38). Takes about 15 s with packages already installed.
#   ../shared/tools/slurm-local.sh start   # prints export lines: eval "$(... start)"
#   ../shared/tools/slurm-local.sh stop
# After start: `sbatch --array=0-3 --wrap '...'`, `squeue`, `scontrol show job N` work, and
#   curl -H "X-SLURM-USER-NAME: root" -H "X-SLURM-USER-TOKEN: $SLURM_JWT" \
#        http://127.0.0.1:6820/slurm/v0.0.38/ping
#   POST /slurm/v0.0.38/job/submit  {"script": "#!/bin/bash\n...", "job": {"name": "...", "array": "0-3",
#        "current_working_directory": "/tmp", "standard_output": "/tmp/x-%A_%a.out",
#        "environment": {"PATH": "/usr/bin:/bin"}, "cpus_per_task": 1, "memory_per_cpu": 100}}
#   GET  /slurm/v0.0.38/job/{id}   -> {"jobs": [{"job_id", "array_task_id", "job_state", ...}]}
#   DELETE /slurm/v0.0.38/job/{id} cancels.
# There is no slurmdbd, so sacct has no data and slurmrestd serves only openapi/v0.0.38; finished
# jobs vanish after MinJobAge (300 s), so a client must record terminal states itself.
# REST notes (22.05): exit_code is the raw wait status (exit 3 -> 768); errors come in "errors": [...]
# often with HTTP 500 (bad token, unknown job), so always parse the body; "environment" must be a
# JSON object here (v0.0.39+ changed it to an array: pin the API version in config);
# "dependency": "afterok:<array id>" chains a merge after an array; DELETE cancels every task.
# Without DefMemPerCPU, CR_Core_Memory gives each job the whole node's memory (jobs run one at a time).
set -euo pipefail
PORT="${SLURMRESTD_PORT:-6820}"
case "${1:-start}" in
stop)
  for p in /run/slurmrestd.pid /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true
  done; rm -f /run/slurmrestd.pid
  # Wait for them to be gone: a start right after would otherwise find a dying daemon and
  # leave it to exit, with nothing listening.
  for _ in $(seq 1 20); do
    pgrep -x slurmrestd >/dev/null || pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.5
  done
  exit 0 ;;
start) ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
if ! command -v slurmctld >/dev/null; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge slurmrestd slurm-wlm-jwt-plugin >&2
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown munge:munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; fi
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
KEY=/var/spool/slurmctld/jwt_hs256.key
[ -s "$KEY" ] || dd if=/dev/urandom of="$KEY" bs=32 count=1 2>/dev/null
chmod 600 "$KEY"
MEM=$(( $(free -m | awk '/Mem:/{print $2}') - 1024 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=localhost
AuthType=auth/munge
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$KEY
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
AccountingStorageType=accounting_storage/none
MinJobAge=300
ReturnToService=2
SchedulerType=sched/backfill
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
rm -f /var/spool/slurmctld/clustername   # a throwaway local cluster: accept a renamed one
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -i
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 1 30); do sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && break; sleep 1; done
sinfo -h -o %t | grep -qE '^(idle|mix|alloc)' || { echo "slurm did not come up; see /var/log/slurm/" >&2; exit 1; }
if ! pgrep -x slurmrestd >/dev/null; then
  runuser -u nobody -- env SLURM_JWT=daemon /usr/sbin/slurmrestd -a rest_auth/jwt -s openapi/v0.0.38 \
    "127.0.0.1:$PORT" > /var/log/slurm/slurmrestd.log 2>&1 &
  echo $! > /run/slurmrestd.pid
fi
TOKEN=$(scontrol token username=root lifespan=86400 | sed 's/^SLURM_JWT=//')
ping() { curl -sf -o /dev/null -H "X-SLURM-USER-NAME: root" -H "X-SLURM-USER-TOKEN: $TOKEN" "http://127.0.0.1:$PORT/slurm/v0.0.38/ping"; }
for _ in $(seq 1 20); do ping && break; sleep 0.5; done
ping || { echo "slurmrestd did not answer on 127.0.0.1:$PORT; see /var/log/slurm/slurmrestd.log" >&2; exit 1; }
echo "export SLURM_JWT='$TOKEN' SLURMRESTD_URL='http://127.0.0.1:$PORT' SLURM_USER=root"
