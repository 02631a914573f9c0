#!/usr/bin/env bash
# Launch vdit-train with torchrun; every argument is a Hydra override.
#
# One node, all local GPUs (or NPROC processes on CPU with gloo):
#   NPROC=8 launch/torchrun.sh model=1.3b data.shards=/data/shards parallel.sp_size=2
#   NPROC=2 launch/torchrun.sh +experiment=quickstart parallel.dp_shard=2     # CPU, gloo
# Several nodes (run the same command on every node; c10d rendezvous on MASTER_ADDR):
#   NNODES=4 MASTER_ADDR=node0 NPROC=8 launch/torchrun.sh model=14b parallel.sp_size=8 ...
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)
fi
# SIGUSR1/SIGTERM go on to the workers, which checkpoint and exit 75 (see vdit.train.preemption).
exec torchrun \
  --nnodes "${NNODES:-1}" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --nproc_per_node "${NPROC}" \
  --rdzv_backend c10d \
  --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv_id "${RDZV_ID:-vdit}" \
  -m vdit.train.main "$@"
