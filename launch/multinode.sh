#!/usr/bin/env bash
# One node of a multi-node run: start this on every node (SLURM: launch/slurm/*.sbatch does).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=29500 bash launch/multinode.sh CONFIG [args]
# Environment:
#   NNODES          number of nodes (SLURM_NNODES when unset)
#   NODE_RANK       this node's rank, 0..NNODES-1 (SLURM_NODEID when unset)
#   MASTER_ADDR     address of node 0, reachable from every node
#   MASTER_PORT     a free TCP port on node 0 (default 29500)
#   NPROC_PER_NODE  processes per node (default: number of GPUs, else 1)
# torchrun's static rendezvous on MASTER_ADDR:MASTER_PORT: global ranks are
# NODE_RANK * NPROC_PER_NODE + local rank, the same on every launch (so a resumed run sees the
# same ranks). Arguments after CONFIG (--resume, overrides) go to gspo-train unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [--resume] [section.key=value ...]" >&2; exit 2; }
CONFIG=$1; shift
NNODES=${NNODES:-${SLURM_NNODES:-}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (this node, 0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
MASTER_PORT=${MASTER_PORT:-29500}
# Exported for the pre-flight below: it tells this launch's own run lock (held by node 0's rank 0,
# which may have started already) from another run's.
export MASTER_ADDR MASTER_PORT
source launch/torchrun_env.sh
echo "node $NODE_RANK/$NNODES: $NPROC_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
# Every node checks its own view of the inputs (a file missing on one node shows up there) as
# one line and exit status 2, before torchrun.
WORLD_SIZE=$((NNODES * NPROC_PER_NODE)) LOCAL_WORLD_SIZE=$NPROC_PER_NODE "$PYTHON" -m gspo_megatron.train --check --config "$CONFIG" "$@"
exec "$PYTHON" -m gspo_megatron.distributed.torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --nproc-per-node "$NPROC_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m gspo_megatron.train --config "$CONFIG" "$@"
