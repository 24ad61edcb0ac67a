#!/usr/bin/env bash
# Launch mha-train under torchrun: one node or several, NPROC processes (devices) per node.
#
#   scripts/launch_torchrun.sh trainer.max_steps=100           # 1 node x 2 processes, tp=2 (CPU, gloo)
#   NPROC=4 TP=2 scripts/launch_torchrun.sh trainer=gpu          # 1 node x 4 GPUs: dp=2 x tp=2
#   # 2 nodes x 8 GPUs, tp=8 inside a node, dp=2 across: run this on every node, with the same
#   # MASTER_ADDR (node 0), RUN_DIR (on a shared file system) and RDZV_ID:
#   NNODES=2 NPROC=8 TP=8 MASTER_ADDR=node0 RUN_DIR=/shared/runs/exp1 scripts/launch_torchrun.sh trainer=gpu
#
# Extra arguments are Hydra overrides for mha-train. Lightning detects torchrun's environment
# (TorchElasticEnvironment) and starts no processes itself, so trainer.devices and
# trainer.num_nodes must match --nproc-per-node and --nnodes: this script passes both.
set -euo pipefail

NNODES=${NNODES:-1}
NPROC=${NPROC:-2}                 # processes per node = trainer.devices
TP=${TP:-$NPROC}                  # parallel.tensor_parallel_size; must divide model.num_heads
DP=$(( NNODES * NPROC / TP ))     # parallel.data_parallel_size (mha-train checks dp x tp = world size)
# All ranks on all nodes must write into one folder (a sharded checkpoint is one folder written by
# every rank), so the run directory is fixed here instead of by each rank's own clock.
RUN_DIR=${RUN_DIR:-${MHA_LOG_DIR:-logs}/train/runs/torchrun_$(date +%Y-%m-%d_%H-%M-%S)}

if [[ "$NNODES" == 1 ]]; then
  rdzv=(--standalone)             # single node: a local rendezvous on a free port
else
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR to node 0}:${MASTER_PORT:-29500}"
        --rdzv-id "${RDZV_ID:-mha-train}")
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per process unless told otherwise
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" "${rdzv[@]}" -m mha_lightning.train \
  trainer.num_nodes="$NNODES" trainer.devices="$NPROC" \
  parallel.tensor_parallel_size="$TP" parallel.data_parallel_size="$DP" \
  hydra.run.dir="$RUN_DIR" "$@"
