#!/usr/bin/env bash
# Pretrain on every node of a DeepSpeed hostfile; fail loudly, naming the node, if any rank fails.
#
# usage: scripts/launch_multinode.sh HOSTFILE --deepspeed_config ds_configs/X.json --model base --data P ... --save DIR
#
# HOSTFILE lines are "hostname slots=N" (N = GPUs on that node). Every node must see this repository, its
# .venv and the --save directory at the same paths (shared storage): relaunching the same command after a
# node failure resumes from the newest complete checkpoint there.
#
# Environment:
#   LAUNCHER       deepspeed multi-node backend: pdsh (default), openmpi, mpich, slurm, ...
#   LAUNCHER_ARGS  extra launcher flags, e.g. "--no_ssh --node_rank 1 --master_addr 10.0.0.1" to start one
#                  node by hand (run the script on every node with its own --node_rank), "--num_gpus 4"
#   MASTER_ADDR    address of the first host (default: first host of HOSTFILE; 127.0.0.1 for --no_ssh tests)
#   MASTER_PORT    rendezvous port (default 29500)
# SIGTERM/SIGINT to this script go to the whole launch: every rank stops at the same step, saves, and the
# script exits 0; relaunch the same command to resume.
# Exported to every node (through a DeepSpeed env file): PATH, VIRTUAL_ENV, PYTHONPATH, and every NCCL_*,
# DS_*, OMP_*, CUDA_*, WANDB_*, HF_*, TORCH_* variable set here (e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
hostfile=$1
shift
if [[ ! -f $hostfile ]]; then
    echo "error: hostfile $hostfile does not exist; pass a file with lines 'hostname slots=N'" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
if [[ -d $venv/bin ]]; then
    export PATH="$venv/bin:$PATH" VIRTUAL_ENV=$venv
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

env_file=$(mktemp "${TMPDIR:-/tmp}/deepspeed_env.XXXXXX")
log=$(mktemp "${TMPDIR:-/tmp}/launch_multinode.XXXXXX.log")
trap 'rm -f "$env_file"' EXIT
{
    echo "PATH=$PATH"
    [[ -n ${VIRTUAL_ENV:-} ]] && echo "VIRTUAL_ENV=$VIRTUAL_ENV"
    env | grep -E '^(NCCL_|DS_|OMP_|CUDA_|WANDB_|HF_|TORCH_)' | grep -v '^DS_ENV_FILE=' || true
} >"$env_file"
export DS_ENV_FILE=$env_file

first_host=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")
read -r -a extra <<<"${LAUNCHER_ARGS:-}"
cmd=(deepspeed --hostfile "$hostfile" --launcher "${LAUNCHER:-pdsh}" --master_addr "${MASTER_ADDR:-$first_host}"
    --master_port "${MASTER_PORT:-29500}" "${extra[@]}" --module pretrain.train "$@")
echo "launching: ${cmd[*]}" >&2
# The launcher runs in its own process group and SIGTERM/SIGINT sent to this script go to all of it:
# DeepSpeed's local runner does not forward them, and every rank must see one to stop and save.
set +e
set -m
"${cmd[@]}" > >(trap '' TERM INT; exec tee "$log") 2>&1 & # tee outlives the ranks' last words
pid=$!
set +m
stopped=
trap 'stopped=1; kill -TERM -- -"$pid" 2>/dev/null' TERM INT
wait "$pid"
rc=$?
while kill -0 "$pid" 2>/dev/null; do # a trapped signal interrupted `wait`: the ranks are still saving
    wait "$pid"
    rc=$?
done
while kill -0 -- -"$pid" 2>/dev/null; do sleep 1; done # the launcher's children (ranks) exit after it
set -e

# pdsh prefixes each remote line with "host: " and has been known to exit 0 when a remote rank failed, so
# the log is checked as well as the exit code.
hosts=$(awk 'NF && $1 !~ /^#/ {print $1}' "$hostfile" | paste -sd'|' | sed 's/\./\\./g')
failed=$(grep -E "^($hosts): .*(exits with return code = [1-9]|Traceback|error: )" "$log" |
    cut -d: -f1 | sort -u | tr '\n' ' ' || true)
node=$first_host
for ((i = 0; i < ${#extra[@]}; i++)); do # --no_ssh: this script started one node, named by --node_rank
    if [[ ${extra[$i]} == --node_rank ]]; then
        node=$(awk 'NF && $1 !~ /^#/ {print $1}' "$hostfile" | sed -n "$((extra[i + 1] + 1))p")
    fi
done
if [[ -n $failed ]]; then
    echo "error: training failed on node(s): ${failed% } (log: $log)" >&2
    exit $((rc == 0 ? 1 : rc))
fi
if [[ -n $stopped ]]; then
    echo "stopped by a signal: every rank saved at the same step; relaunch the same command to resume" >&2
    rm -f "$log"
    exit 0
fi
if [[ $rc -ne 0 ]]; then
    echo "error: training failed on node $node with exit code $rc (log: $log)" >&2
    exit "$rc"
fi
rm -f "$log"
