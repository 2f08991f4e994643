#!/usr/bin/env bash
# Superseded (bench/archive/README.md): the session-1 lever table; current figures: bench/train_product.py.
# Device call 1 of issue 6: seed recipe vs single levers, one process each. Output: $OUT/levers.jsonl
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/liger_kernel*.whl .whl/bitsandbytes*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch,transformers,peft;print('torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"
R=${OUT:-/tmp}/levers.jsonl
run() { timeout 150 "$@" 2>&1 | grep -E '^\{|Error|error' | tail -3 | tee -a $R; }
run python3 bench/seed_recipe_baseline.py
run python3 bench/archive/profile_levers.py --pack 4 --adapter fp32 --liger
run python3 bench/archive/profile_levers.py --pack 4 --adapter bf16 --liger
run python3 bench/archive/profile_levers.py --pack 4 --adapter fp32-autocast --liger
run python3 bench/archive/profile_levers.py --pack 2 --adapter bf16 --liger
run python3 bench/archive/profile_levers.py --pack 1 --adapter bf16 --liger
run python3 bench/archive/profile_levers.py --pack 4 --adapter bf16 --liger --attn flex_attention
run python3 bench/archive/profile_levers.py --pack 4 --adapter bf16 --liger --ckpt --fused-adam
timeout 150 python3 bench/archive/profile_levers.py --pack 2 --adapter bf16 --liger --profile --steps 3 > ${OUT:-/tmp}/profile_pack2.txt 2>&1; tail -1 ${OUT:-/tmp}/profile_pack2.txt | tee -a $R
