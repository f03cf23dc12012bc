#!/bin/bash
# One node, all its GPUs, FSDP2:   launch/torchrun.sh model=mistral-7b-v0.3 model.checkpoint=/models/m7b
# Two nodes (run on each, same endpoint and id):
#   NNODES=2 RDZV_ENDPOINT=node0:29500 RDZV_ID=myrun launch/torchrun.sh <overrides>
set -euo pipefail
nproc=${NPROC_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
# --shutdown-timeout: seconds the workers get to save a checkpoint after SIGTERM (torchrun's default: 30).
exec torchrun \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-100}" \
    --nnodes "${NNODES:-1}" \
    --nproc-per-node "${nproc:-1}" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${RDZV_ENDPOINT:-localhost:0}" \
    --rdzv-id "${RDZV_ID:-mft}" \
    -m mft.train "$@"
