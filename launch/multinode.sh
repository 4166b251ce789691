#!/usr/bin/env bash
# Multi-node launch through torchrun's c10d rendezvous. Run the same command on every node:
#   bash launch/multinode.sh NNODES NODE_RANK HOST:PORT [launch/train.py options...]
# HOST:PORT is reachable from every node (e.g. node 0's address and a free port).
# NPROC_PER_NODE (default: the node's GPU count, or 1 without GPUs) ranks start on each node.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash launch/multinode.sh NNODES NODE_RANK HOST:PORT [train.py options]" >&2
  exit 2
fi
nnodes=$1 node_rank=$2 endpoint=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
nproc=${NPROC_PER_NODE:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 1)}
exec python -m torch.distributed.run --nnodes "$nnodes" --node-rank "$node_rank" \
  --nproc-per-node "$nproc" --rdzv-backend c10d --rdzv-endpoint "$endpoint" \
  --rdzv-id "${RDZV_ID:-cce-dist}" "$here/train.py" "$@"
