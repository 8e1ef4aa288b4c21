#!/usr/bin/env bash
# Two CPU ranks on one machine (gloo), e.g. to try ZeRO-3 or AutoEP expert parallelism locally:
#
#   scripts/cpu_two_ranks.sh recipe=ar_pretrain deepspeed.zero_stage=3 budget.tokens=200000
#   scripts/cpu_two_ranks.sh recipe=ar_pretrain model=tiny_qwen3_moe deepspeed.zero_stage=2 \
#       deepspeed.expert_parallel_size=2 budget.tokens=200000
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export WANDB_MODE=${WANDB_MODE:-offline}
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node 2 -m ar2diff.train "$@"
