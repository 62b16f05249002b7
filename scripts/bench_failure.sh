#!/usr/bin/env bash
# Time from the SIGKILL of one rank to the exit of scripts/launch_multinode.sh, and the processes left after it.
#
# usage: scripts/bench_failure.sh TRIALS HOSTFILE <bert-pretrain flags, with --save DIR and --log-every 20>
#
# Each trial launches the job, waits for "step 40/" in its output, SIGKILLs the rank with RANK=1 (on the second
# host of HOSTFILE; its processes must be visible here, as with the loopback nodes of scripts/ssh_testbed.sh),
# and reports the seconds until the script exits, its exit code, the processes whose command line names the
# --save directory afterwards, and the script's error line. --save is emptied before each trial.
set -euo pipefail
trials=$1 hostfile=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
save=$(printf '%s\n' "$@" | grep -A1 -x -- --save | tail -1)
for t in $(seq "$trials"); do
    rm -rf "$save"
    log=$(mktemp)
    bash "$root/scripts/launch_multinode.sh" "$hostfile" "$@" >"$log" 2>&1 &
    pid=$!
    until grep -q "step 40/" "$log"; do sleep 0.2; done
    rank=""
    for p in $(pgrep -f "pretrain.train --local_rank=.*$save"); do
        parent=$(ps -o ppid= -p "$p" | xargs ps -o args= -p)
        if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx RANK=1 && [[ $parent == *deepspeed.launcher.launch* ]]; then
            rank=$p
        fi
    done
    t0=$(date +%s.%N)
    kill -9 "$rank"
    rc=0
    wait "$pid" || rc=$?
    t1=$(date +%s.%N)
    left=$( (pgrep -af -- "$save" || true) | grep -vc bench_failure.sh || true)
    echo "trial $t: SIGKILL of rank 1 -> script exit $(python3 -c "print(f'{$t1 - $t0:.2f}')") s, exit code $rc," \
        "processes left: $left; $(grep '^error:' "$log" | cut -c1-120)"
    rm -f "$log"
done
