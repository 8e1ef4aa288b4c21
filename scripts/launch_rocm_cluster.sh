#!/usr/bin/env bash
# Multi-node ROCm (MI300X / MI355X) launch of an ar2diff recipe with the `deepspeed` launcher and a hostfile.
#
#   scripts/launch_rocm_cluster.sh HOSTFILE recipe=tidar_midtrain model.path=/ckpt/ZAYA1-8B \
#       data.sources.0.path='/data/pretrain/*.jsonl' run_dir=/shared/runs/midtrain-001
#
# HOSTFILE lines read "node-01 slots=8". Every node must see the same filesystem (checkpoints, data cache,
# run_dir) and have the same Python environment. `--no_local_rank` keeps the launcher from passing --local_rank,
# which Hydra's command line would reject; ranks read LOCAL_RANK from the environment instead.
set -euo pipefail
HOSTFILE=${1:?usage: $0 HOSTFILE recipe=NAME [overrides...]}
shift

# RCCL / HIP settings a ROCm cluster usually needs; adjust interface names to your fabric.
export HSA_FORCE_FINE_GRAIN_PCIE=1          # fine-grained host memory for RCCL
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-ens}   # bootstrap network interface (prefix match)
export NCCL_IB_HCA=${NCCL_IB_HCA:-}          # e.g. bnxt_re or mlx5 devices for RDMA, empty = autodetect
export NCCL_IB_GID_INDEX=${NCCL_IB_GID_INDEX:-3}      # RoCE v2
export RCCL_MSCCL_ENABLE=${RCCL_MSCCL_ENABLE:-0}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export HIP_FORCE_DEV_KERNARG=1
export PYTORCH_HIP_ALLOC_CONF=${PYTORCH_HIP_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export WANDB_MODE=${WANDB_MODE:-offline}     # set online (and WANDB_API_KEY) to sync
# HIP_VISIBLE_DEVICES selects GPUs per node when needed (the launcher's --include also works).

MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}
MASTER_PORT=${MASTER_PORT:-29500}

exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --no_local_rank --module ar2diff.train "$@"
