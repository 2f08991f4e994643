#!/usr/bin/env bash
# Device call for the MoE benches (carry=[".whl"]): versions, one-layer check, then bench/train_moe.py.
#   bash bench/moe_device.sh [train_moe.py args...]     e.g. --layers 47 --steps 16
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 bench/moe_gpu_check.py --tokens 4096 --layers 2 2>&1 | grep -v -i warn | tail -3
python3 bench/train_moe.py --out "${OUT:-/tmp/moe_out}" "$@" 2>&1 | grep -v -i "warn" | tail -40
