#!/bin/bash
# One node, all its GPUs, FSDP2:   launch/torchrun.sh model=mistral-7b-v0.3 model.checkpoint=/models/m7b
# Two nodes (run on each, same endpoint and id):
#   NNODES=2 RDZV_ENDPOINT=node0:29500 RDZV_ID=myrun launch/torchrun.sh <overrides>
set -euo pipefail
nproc=${NPROC_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
[ "$nproc" -gt 0 ] || nproc=1  # no GPU: one CPU process
# SIGTERM and Ctrl-C reach the workers, not torchrun: they save a checkpoint, print the resume
# command and exit 0, and torchrun then exits 0 too (a signalled torchrun stops its workers and
# exits 1 with a traceback of its own). setsid keeps the terminal's Ctrl-C away from torchrun.
# --shutdown-timeout: seconds the workers get to save a checkpoint if torchrun itself is signalled (default: 30).
setsid torchrun \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-100}" \
    --nnodes "${NNODES:-1}" \
    --nproc-per-node "${nproc:-1}" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${RDZV_ENDPOINT:-localhost:0}" \
    --rdzv-id "${RDZV_ID:-mft}" \
    -m mft.train "$@" &
launcher=$!
trap 'pkill -TERM -P "$launcher" || true' TERM
trap 'pkill -INT -P "$launcher" || true' INT
while true; do
    wait "$launcher" && status=0 || status=$?
    kill -0 "$launcher" 2>/dev/null || break  # a trapped signal ended the wait, not torchrun
done
exit "$status"
