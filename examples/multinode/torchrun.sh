#!/bin/bash
# glmtune under torchrun (or accelerate launch) on two nodes: run this on each node, NODE_RANK=0 on
# node 0 (MASTER_ADDR), NODE_RANK=1 on the other.  NODE_RANK=1 MASTER_ADDR=node01 bash examples/multinode/torchrun.sh
#
# On shared storage: the checkout/venv, the model folder, the data files, output.dir.
# Per node: the GPUs, /tmp, caches. Under an external launcher glmtune's own --nproc/--nnodes flags are
# refused (the launcher owns them); GLMTUNE_DIST_TIMEOUT sets the collective timeout (seconds).
set -euo pipefail
CONFIG=${CONFIG:-configs/roleplay_glm4_lora.yaml}
: "${NODE_RANK:?set NODE_RANK (0 on the master node)}" "${MASTER_ADDR:?set MASTER_ADDR (node 0)}"
MASTER_PORT=${MASTER_PORT:-29517}
NPROC=${NPROC:-8}

if [ "${LAUNCHER:-torchrun}" = torchrun ]; then
    torchrun --nnodes 2 --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
        -m glmtune train "$CONFIG" --resume latest
else  # the same with accelerate launch (--num_processes counts all nodes' processes)
    accelerate launch --multi_gpu --num_machines 2 --machine_rank "$NODE_RANK" --num_processes $((2 * NPROC)) \
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --same_network \
        -m glmtune train "$CONFIG" --resume latest
fi
