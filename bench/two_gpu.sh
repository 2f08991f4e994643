#!/usr/bin/env bash
# Issue 15 on the two-H200 machine, in phases (one device call each; the machine keeps /tmp between
# calls only while it stays warm, so the model folder is rewritten when a phase finds it missing):
#   device call: kind nvidia-h200-x2, carry [".whl"], command  bash bench/two_gpu.sh PHASE
#   lora   seed recipe (1 GPU) and `glmtune train` LoRA on 1 GPU and 2 GPUs (DDP, graphs per process; eager)
#   shard  LoRA under DDP with graphs (compiled and not), FSDP, DeepSpeed ZeRO-2 (global batch 8, as phase
#          lora's 1-GPU batch-8 run), and a profiled 1-GPU run (output.profile_steps)
#   shard2 after the fixes phase shard called for: DDP, FSDP, ZeRO-2, ZeRO-3 (LoRA, 14 steps)
#   zero3  full fine-tuning under DeepSpeed ZeRO-3 (6 steps; what the device time left allowed)
#   full   full fine-tuning of the 9B shape across both GPUs: ZeRO-3 and FSDP
# Raw output: $OUT/PHASE/ (train_product.jsonl, log_*.txt, metrics_*.jsonl, profile_*.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
PHASE=${1:-lora}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/$PHASE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
FAST="--set method.dropout=0 --set speed.adapter_dtype=model"
case "$PHASE" in
  lora)
    python3 bench/train_product.py --out "$OUT/lora" --only lora --steps 20 --warmup 6 --timeout 240 --variants "
      1gpu-b4: $FAST;
      1gpu-b8: $FAST --set train.batch_size=8;
      ddp-b4x2: $FAST --nproc 2;
      ddp-eager-b4x2: $FAST --set speed.cuda_graphs=false --nproc 2" ;;
  shard)
    python3 bench/train_product.py --out "$OUT/shard" --only lora --seed-groups "" --steps 20 --warmup 6 --timeout 200 --variants "
      ddp-b4x2: $FAST --nproc 2;
      ddp-nocompile-b4x2: $FAST --set speed.compile=false --nproc 2;
      fsdp-b4x2: $FAST --nproc 2 --accelerate-config fsdp;
      zero2-b4x2: $FAST --nproc 2 --accelerate-config deepspeed_zero2;
      1gpu-b4-profile: $FAST --set train.max_steps=10 --set output.profile_steps=4" ;;
  shard2)  # after the fixes that phase shard called for
    python3 bench/train_product.py --out "$OUT/shard2" --only lora --seed-groups "" --steps 14 --warmup 4 --timeout 150 --variants "
      ddp-b4x2: $FAST --nproc 2;
      fsdp-b4x2: $FAST --nproc 2 --accelerate-config fsdp;
      zero2-b4x2: $FAST --nproc 2 --accelerate-config deepspeed_zero2;
      zero3-b4x2: $FAST --nproc 2 --accelerate-config deepspeed_zero3" ;;
  zero3)
    FULL="--set method.name=full --set train.lr=1e-5 --set train.batch_size=2"
    python3 bench/train_product.py --out "$OUT/zero3" --only lora --seed-groups "" --steps 6 --warmup 2 --timeout 230 --variants "
      full-zero3-b2x2: $FULL --nproc 2 --accelerate-config deepspeed_zero3" ;;
  full)
    FULL="--set method.name=full --set train.lr=1e-5 --set train.batch_size=2"
    python3 bench/train_product.py --out "$OUT/full" --only lora --seed-groups "" --steps 8 --warmup 3 --timeout 270 --variants "
      full-zero3-b2x2: $FULL --nproc 2 --accelerate-config deepspeed_zero3;
      full-fsdp-b2x2: $FULL --nproc 2 --accelerate-config fsdp" ;;
  *) echo "unknown phase $PHASE"; exit 2 ;;
esac
