#!/usr/bin/env bash
# Launch mha-train under torchrun: one node or several, NPROC processes (devices) per node.
#
#   scripts/launch_torchrun.sh trainer.max_steps=100           # 1 node x 2 processes, tp=2 (CPU, gloo)
#   NPROC=4 TP=2 scripts/launch_torchrun.sh trainer=gpu          # 1 node x 4 GPUs: dp=2 x tp=2
#
# Several nodes: run the same command on every node, with the same NNODES, MASTER_ADDR (any one of
# the nodes; its port MASTER_PORT, default 29500, must be reachable from the others), RUN_DIR (one
# folder on a file system every node shares: a sharded checkpoint is one folder written by every
# rank) and RDZV_ID (one per job). 2 nodes x 8 GPUs, tp=8 inside each node, dp=2 across them:
#
#   node0$ NNODES=2 NPROC=8 TP=8 MASTER_ADDR=node0 RUN_DIR=/shared/runs/exp1 RDZV_ID=exp1 \
#            scripts/launch_torchrun.sh trainer=gpu model=base
#   node1$ NNODES=2 NPROC=8 TP=8 MASTER_ADDR=node0 RUN_DIR=/shared/runs/exp1 RDZV_ID=exp1 \
#            scripts/launch_torchrun.sh trainer=gpu model=base
#
# The rendezvous (c10d, on MASTER_ADDR) waits for all NNODES agents, then numbers the nodes and gives
# each node consecutive global ranks; no node rank is needed. The (dp, tp) device mesh puts
# consecutive ranks in one tensor-parallel group, so with TP dividing NPROC every tp group lies inside
# one node: tp all-reduces activations in every layer, forward and backward, and needs the fast links
# inside a node (NVLink); FSDP on the data-parallel dim moves parameters and gradients once per layer
# per step, overlapped with compute, which the network between nodes can carry (Megatron and NeMo
# advise the same: tensor parallelism inside a node, data parallelism across nodes).
#
# Extra arguments are Hydra overrides for mha-train. Lightning detects torchrun's environment
# (TorchElasticEnvironment) and starts no processes itself, so trainer.devices and
# trainer.num_nodes must match --nproc-per-node and --nnodes: this script passes both (mha-train
# refuses a mismatch in one line).
set -euo pipefail

NNODES=${NNODES:-1}
NPROC=${NPROC:-2}                 # processes per node = trainer.devices
TP=${TP:-$NPROC}                  # parallel.tensor_parallel_size; must divide model.num_heads
DP=$(( NNODES * NPROC / TP ))     # parallel.data_parallel_size (mha-train checks dp x tp = world size)
fail() { echo "error: $*" >&2; exit 2; }

# All ranks on all nodes must write into one folder (a sharded checkpoint is one folder written by
# every rank), so the run directory is fixed here instead of by each rank's own clock.
if [[ "$NNODES" == 1 ]]; then
  RUN_DIR=${RUN_DIR:-${MHA_LOG_DIR:-logs}/train/runs/torchrun_$(date +%Y-%m-%d_%H-%M-%S)}
  rdzv=(--standalone)             # single node: a local rendezvous on a free port
else
  # A default named after each node's clock would give every node a folder of its own.
  [[ -n "${RUN_DIR:-}" ]] || fail "NNODES=$NNODES: set RUN_DIR to one folder that every node shares (the same on every node)"
  [[ -n "${MASTER_ADDR:-}" ]] || fail "NNODES=$NNODES: set MASTER_ADDR to the address of one of the nodes (the same on every node)"
  if (( NPROC % TP )); then
    echo "warning: TP=$TP does not divide NPROC=$NPROC: tensor-parallel groups span nodes (slow); see the top of $0" >&2
  fi
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-mha-train}")
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per process unless told otherwise
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" "${rdzv[@]}" -m mha_lightning.train \
  trainer.num_nodes="$NNODES" trainer.devices="$NPROC" \
  parallel.tensor_parallel_size="$TP" parallel.data_parallel_size="$DP" \
  hydra.run.dir="$RUN_DIR" "$@"
