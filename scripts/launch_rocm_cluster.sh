#!/usr/bin/env bash
# Multi-node ROCm (MI300X / MI355X) launch of an ar2diff recipe with the `deepspeed` launcher and a hostfile.
#
#   scripts/launch_rocm_cluster.sh HOSTFILE recipe=tidar_midtrain model.path=/ckpt/ZAYA1-8B \
#       data.sources.0.path='/data/pretrain/*.jsonl' run_dir=/shared/runs/midtrain-001
#   DRY_RUN=1 scripts/launch_rocm_cluster.sh HOSTFILE recipe=tidar_midtrain model.path=/ckpt/ZAYA1-8B
#
# HOSTFILE lines read "node-01 slots=8". Every node must see the same filesystem (checkpoints, data cache,
# run_dir) and have the same Python environment.
#
# Why an environment file: with more than one node DeepSpeed starts every rank (the first node's too) through
# pdsh/ssh and forwards only variables named MLFLOW*/PYTHON*/MV2*/UCX*/NCCL* plus the KEY=VALUE lines of the file
# named by DS_ENV_FILE. So every setting below (and every name in FORWARD_ENV, plus any HSA_/HIP_/RCCL_/NCCL_/
# WANDB_/HF_ variable already set) is written to a file of this launch, <run_dir>/launch/ds_env, and DS_ENV_FILE
# points at it: concurrent launches never share one. The run folder is fixed here, before any rank starts.
#
# Options (environment): DRY_RUN=1 prints the layout, the per-node command and the environment, starts nothing.
# FORWARD_ENV="NAME1 NAME2" forwards more variables of this shell. HARDWARE=mi300x adds the memory plan's verdict.
# MASTER_ADDR (default: the first host) and MASTER_PORT (29500).
set -euo pipefail
HOSTFILE=${1:?usage: $0 HOSTFILE recipe=NAME [overrides...]}
shift
# One line naming the hostfile, not grep's bare "No such file or directory" (or a silent exit on a file without hosts).
if [[ ! -f $HOSTFILE || ! -r $HOSTFILE ]]; then
    echo "$0: error: hostfile $HOSTFILE does not exist or cannot be read; give a file of lines like 'node-01 slots=8'" \
         "as the first argument" >&2
    exit 1
fi
if ! grep -q -v '^\s*\(#\|$\)' "$HOSTFILE"; then
    echo "$0: error: hostfile $HOSTFILE lists no host; add one line per node like 'node-01 slots=8'" >&2
    exit 1
fi

# --- site-specific: adapt these to your fabric -------------------------------------------------------------------
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-ens}   # SITE: bootstrap network interface (prefix match)
export NCCL_IB_HCA=${NCCL_IB_HCA:-}                   # SITE: RDMA devices, e.g. bnxt_re or mlx5_0,mlx5_1; empty = autodetect
export NCCL_IB_GID_INDEX=${NCCL_IB_GID_INDEX:-3}      # SITE: RoCE v2 GID index of your NICs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}          # SITE: host cores per rank
# --- ROCm / RCCL / PyTorch settings every MI300X-class run wants -------------------------------------------------
export HSA_FORCE_FINE_GRAIN_PCIE=1                    # fine-grained host memory for RCCL
export HIP_FORCE_DEV_KERNARG=1                        # kernel arguments in device memory (lower launch latency)
export RCCL_MSCCL_ENABLE=${RCCL_MSCCL_ENABLE:-0}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1              # a failed collective aborts the job instead of hanging
export PYTORCH_HIP_ALLOC_CONF=${PYTORCH_HIP_ALLOC_CONF:-expandable_segments:True}
export WANDB_MODE=${WANDB_MODE:-offline}              # set online (and WANDB_API_KEY) to sync
# HIP_VISIBLE_DEVICES selects GPUs per node when needed (the launcher's --include also works).
SETTINGS="NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_GID_INDEX OMP_NUM_THREADS HSA_FORCE_FINE_GRAIN_PCIE
HIP_FORCE_DEV_KERNARG RCCL_MSCCL_ENABLE TORCH_NCCL_ASYNC_ERROR_HANDLING PYTORCH_HIP_ALLOC_CONF WANDB_MODE"

MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^\s*\(#\|$\)' "$HOSTFILE" | head -n1 | awk '{print $1}')}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

# Layout check (hostfile slots vs the recipe's parallel sizes) and the run folder, before anything starts.
HELPER_ARGS=("$HOSTFILE" ${HARDWARE:+hardware=$HARDWARE} "$@")
[[ ${DRY_RUN:-0} == 1 ]] && HELPER_ARGS=(--dry-run "${HELPER_ARGS[@]}")
RUN_DIR=$("$PYTHON" -m ar2diff.launch "${HELPER_ARGS[@]}")
USER_ARGS=("$@")
has_run_dir=0
for arg in "$@"; do [[ $arg == run_dir=* ]] && has_run_dir=1; done
[[ $has_run_dir == 0 ]] && USER_ARGS+=("run_dir=$RUN_DIR")

# The launch-local environment file: KEY=VALUE lines only (DeepSpeed splits every line at its first '=').
extra=$(env | grep -oE '^(HSA|HIP|RCCL|NCCL|WANDB|HF)_[A-Za-z0-9_]*=' | tr -d '=' || true)
ENV_LINES=""
for name in $SETTINGS ${FORWARD_ENV:-} $extra; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "FORWARD_ENV: $name is not a variable name" >&2; exit 1; }
    [[ -v $name ]] || { echo "FORWARD_ENV: $name is not set in this shell" >&2; exit 1; }
    value=${!name}
    [[ $value != *$'\n'* ]] || { echo "$name holds a newline; it cannot be forwarded" >&2; exit 1; }
    grep -q "^$name=" <<<"$ENV_LINES" || ENV_LINES+="$name=$value"$'\n'
done
ENV_FILE="$RUN_DIR/launch/ds_env"
CMD=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     --no_local_rank --module ar2diff.train "${USER_ARGS[@]}")

if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "run folder: $RUN_DIR"
    echo "environment file ($ENV_FILE, DS_ENV_FILE; forwarded to every rank):"
    printf '%s' "$ENV_LINES" | sed 's/^/  /'
    echo "launcher: DS_ENV_FILE=$ENV_FILE ${CMD[*]}"
    node_rank=0
    while read -r host slots; do
        echo "node $node_rank ($host, ${slots#slots=} ranks): cd $PWD; $PYTHON -u -m deepspeed.launcher.launch" \
             "--node_rank=$node_rank --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT --no_local_rank" \
             "--module ar2diff.train ${USER_ARGS[*]}"
        node_rank=$((node_rank + 1))
    done < <(grep -v '^\s*\(#\|$\)' "$HOSTFILE")
    exit 0
fi

mkdir -p "$RUN_DIR/launch"
printf '%s' "$ENV_LINES" > "$ENV_FILE"
export DS_ENV_FILE=$ENV_FILE
exec "${CMD[@]}"
