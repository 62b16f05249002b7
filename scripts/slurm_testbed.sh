#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine for the Slurm tests: slurmctld, and one slurmd for each of the
# nodes n1 (127.0.0.1) and n2 (127.0.0.2), each on its own port, authenticated by a munged of its own.
#
# usage: scripts/slurm_testbed.sh start DIR   (then: export SLURM_CONF=DIR/slurm.conf BERT_SLURM_TESTBED=DIR)
#        scripts/slurm_testbed.sh stop DIR
#
# Everything lives in DIR: slurm.conf, the munge key and socket, state, spool, pid and log files. Nothing
# outside DIR is read or changed: not /etc/slurm, not /etc/munge, not a system munged or slurmd (the
# commands find this cluster through SLURM_CONF, and slurm.conf points them at DIR's munge socket).
# `start` installs Debian's slurm-wlm and munge with apt-get only when they are missing and it runs as root
# (CI); elsewhere it says what to install. The daemons run as root (SlurmUser=root), so start needs root.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [[ -z $cmd || -z $dir || ($cmd != start && $cmd != stop) ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

stop() {
    local name pid
    for name in slurmd.n1 slurmd.n2 slurmctld munged; do
        [[ -f $dir/$name.pid ]] || continue
        pid=$(cat "$dir/$name.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/$name.pid"
    done
}

if [[ $cmd == stop ]]; then
    stop
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "error: the Slurm testbed runs its daemons as root (SlurmUser=root); run it as root (CI does)" >&2
    exit 2
fi
missing=()
[[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/bin/sbatch ]] || missing+=(slurm-wlm)
[[ -x /usr/sbin/munged ]] || missing+=(munge)
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null; then
        echo "error: the Slurm testbed needs ${missing[*]}; install them (Debian: apt-get install ${missing[*]})" >&2
        exit 2
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

stop
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mkdir -p "$dir/state" "$dir/spool/n1" "$dir/spool/n2" "$dir/munge"
chmod 700 "$dir/munge"
[[ -f $dir/munge/munge.key ]] || head -c 1024 /dev/urandom >"$dir/munge/munge.key"
chmod 400 "$dir/munge/munge.key"
# munged refuses a socket directory others may write to (DIR may sit under /tmp): --force accepts it here.
munged --force --socket="$dir/munge/socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"

cpus=$(nproc)
cat >"$dir/slurm.conf" <<EOF
ClusterName=berttest
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/socket,cred_expire=15
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=600
SchedulerParameters=defer_batch
NodeName=n1 NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.2 Port=$(free_port) CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF" -c  # -c: no job or node state from an earlier start
slurmd -f "$SLURM_CONF" -N n1
slurmd -f "$SLURM_CONF" -N n2
for _ in $(seq 150); do
    if [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | grep -Ec '^n[12] idle') == 2 ]]; then
        echo "slurm testbed ready: nodes n1 and n2; export SLURM_CONF=$SLURM_CONF BERT_SLURM_TESTBED=$dir"
        exit 0
    fi
    sleep 0.2
done
echo "error: the Slurm testbed in $dir did not come up (see $dir/slurmctld.log, $dir/slurmd.n1.log)" >&2
sinfo -N >&2 || true
exit 1
