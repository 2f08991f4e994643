#!/usr/bin/env bash
# Issue 14 at full size: a GLM-4-9B-shaped random checkpoint in glm-4-9b-chat's SOURCE layout
# (model_type chatglm, auto_map -> modeling_chatglm.py that raises if imported, 10 bf16 safetensors
# shards + index, the glm-4 tokenizer.model), generated on the GPU and written shard by shard;
# then `glmtune model import-chatglm` (peak host RSS and time measured); then the imported folder's
# logits against the independent ChatGLM reference (tests/models/chatglm_reference.py, fp32, from
# the source tensors); then `glmtune train` for a few LoRA steps (speed levers auto) on it.
#
# Device call (nvidia-h200, ~10 min): carry=[".whl"], command
#   bash bench/chatglm_import_gpu.sh
# .whl/*.whl: pydantic and the other wheels the device image lacks (as bench/run_gpu_tests.sh).
# CPU smoke run of the same steps at the tiny shape: SHAPE=tiny STEPS=1 BATCH=1 bash bench/chatglm_import_gpu.sh
# VERIFY=0 skips step 3 (it holds the checkpoint in bf16 and the model in fp32 on the GPU: ~60 GB).
# Raw output: $OUT/chatglm_import_gpu.txt (or bench/results/ when $OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/tests/models
SHAPE=${SHAPE:-9b}
STEPS=${STEPS:-8}
BATCH=${BATCH:-8}
# FROM=N starts at step N and reuses $WORK (kept while the device stays warm) when one call's
# 10 minutes do not cover all four steps: first call FROM=1 STOP=2, second call FROM=3.
FROM=${FROM:-1}
STOP=${STOP:-4}
WORK=${WORK:-/tmp/glmtune-chatglm-bench}
LOG=${OUT:-bench/results}/chatglm_import_gpu$([ "$FROM" = 1 ] || echo "_from$FROM").txt
mkdir -p "$(dirname "$LOG")"
[ "$FROM" = 1 ] && rm -rf "$WORK"
mkdir -p "$WORK"
run_step() { [ "$FROM" -le "$1" ] && [ "$1" -le "$STOP" ]; }

# Wall time and peak RSS of one child command (the import must not hold the 18 GB checkpoint at once).
# The timer is `python3 -c` so the child keeps this shell's stdin (its heredoc script).
TIMER='
import resource, subprocess, sys, time
t = time.time()
rc = subprocess.call(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
print(f"[{chr(32).join(sys.argv[1:4])} ...] exit {rc}, wall {time.time() - t:.1f} s, peak RSS {peak:.2f} GiB", flush=True)
sys.exit(rc)'
timed() { python3 -c "$TIMER" "$@"; }

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"

  run_step 1 && echo "== 1. source checkpoint (glm-4-9b-chat layout, shape $SHAPE)" &&
  timed python3 - "$WORK/src" "$SHAPE" <<'EOF'
import sys, time
import torch
from glmtune.models.tiny_chatglm import TINY_CHATGLM, write_chatglm_checkpoint
out, shape = sys.argv[1], sys.argv[2]
t = time.time()
write_chatglm_checkpoint(out, "glm4", "glmtune/resources/tokenizers/glm4", overrides=TINY_CHATGLM if shape == "tiny" else None,
                         device="cuda" if torch.cuda.is_available() else "cpu")
print(f"written in {time.time() - t:.1f} s")
EOF
  run_step 1 && du -sh "$WORK/src" && ls "$WORK/src"

  run_step 2 && echo "== 2. glmtune model import-chatglm" &&
  timed python3 -m glmtune model import-chatglm "$WORK/src" --out "$WORK/native" --dtype bf16 --overwrite &&
  du -sh "$WORK/native" && ls "$WORK/native" && cat "$WORK/native/config.json"

  run_step 3 && [ "${VERIFY:-1}" = 1 ] &&
  echo "== 3. imported folder (fp32) vs the ChatGLM reference from the source tensors (fp32, no TF32)" &&
  python3 - "$WORK/src" "$WORK/native" <<'EOF'
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from chatglm_reference import chatglm_reference_logits, read_source_tensors
from glmtune.models.tokenizer import load_tokenizer
from glmtune.templates import get_template
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
src, native = Path(sys.argv[1]), Path(sys.argv[2])
dev = "cuda" if torch.cuda.is_available() else "cpu"
msgs = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "请介绍一下长城。" * 8}]
ids = get_template("glm4").encode_prompt(load_tokenizer(native), msgs)
with torch.no_grad():
    ref = chatglm_reference_logits(read_source_tensors(src, dev), json.loads((src / "config.json").read_text()), ids)
    torch.cuda.empty_cache() if dev == "cuda" else None
    model = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32, device_map=dev).eval()
    out = model(input_ids=torch.tensor([ids], device=dev)).logits[0]
diff = (out - ref).abs()
print(f"{len(ids)} tokens: max |logit diff| {diff.max().item():.3g} (logit std {ref.std().item():.3g}), "
      f"relative {(diff.max() / ref.abs().max()).item():.3g}, same argmax at "
      f"{(out.argmax(-1) == ref.argmax(-1)).float().mean().item():.0%} of positions")
EOF

  run_step 4 && echo "== 4. glmtune train: LoRA, $STEPS steps, speed levers auto" &&
  python3 - "$WORK" "$STEPS" "$BATCH" <<'EOF'
import json, random, sys
from pathlib import Path
work, steps, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(0)
words = "长城 故宫 黄河 长江 熊猫 茶叶 丝绸 瓷器 书法 京剧 火锅 饺子 月饼 春节 端午 中秋".split()
with open(work / "train.jsonl", "w", encoding="utf-8") as f:
    for i in range(256):
        q = "，".join(rng.choices(words, k=rng.randint(4, 40)))
        a = "。".join(rng.choices(words, k=rng.randint(8, 120)))
        f.write(json.dumps({"messages": [{"role": "user", "content": f"请解释：{q}"},
                                         {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n")
cfg = {"model": {"path": str(work / "native"), "dtype": "bf16"},
       "data": {"datasets": [str(work / "train.jsonl")], "cutoff_len": 1024},
       "method": {"name": "lora", "r": 64, "alpha": 128},
       "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "seed": 0},
       "output": {"dir": str(work / "run"), "plot": False, "tensorboard": False}}
(work / "lora.yaml").write_text(json.dumps(cfg, indent=1))
EOF
  run_step 4 && rm -rf "$WORK/run" && timed python3 -m glmtune train "$WORK/lora.yaml" &&
  cat "$WORK/run/metrics.jsonl" && ls "$WORK/run/final"
  date -u
} 2>&1 | tee "$LOG"
[ "$STOP" = 4 ] && rm -rf "$WORK"
true
