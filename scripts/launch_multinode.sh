#!/usr/bin/env bash
# Pretrain on every node of a DeepSpeed hostfile, supervised (pretrain/launcher.py): a failure on any node ends
# every rank on every node within seconds and names the node and the cause; SIGTERM/SIGINT make every rank stop
# at the same step, save and exit 0; nothing of the launch is left on any node when this script exits.
#
# usage: scripts/launch_multinode.sh HOSTFILE [--max-restarts N] [--stop-timeout S] --deepspeed_config X.json \
#            --model base --data PREFIX ... --save DIR
#
# HOSTFILE lines are "hostname slots=N" (N = GPUs on that node). Every node must see this repository, its
# .venv and the --save directory at the same paths (shared storage): relaunching the same command after a
# failure resumes from the newest complete checkpoint there (--max-restarts N does it by itself).
#
# Environment:
#   LAUNCHER       deepspeed multi-node backend: pdsh (default), openmpi, mpich, slurm, ...
#   LAUNCHER_ARGS  extra launcher flags, e.g. "--no_ssh --node_rank 1" to start one node by hand (run the
#                  script on every node with its own --node_rank), "--num_gpus 4"
#   MASTER_ADDR    address of the first host (default: first host of HOSTFILE)
#   MASTER_PORT    rendezvous port (default 29500)
# Exported to every node (through a DeepSpeed env file): PATH, VIRTUAL_ENV, PYTHONPATH, and every NCCL_*,
# DS_*, OMP_*, CUDA_*, WANDB_*, HF_*, TORCH_*, BERT_* variable set here (e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
if [[ -d $venv/bin ]]; then
    export PATH="$venv/bin:$PATH" VIRTUAL_ENV=$venv
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec python -m pretrain.launcher "$@"
