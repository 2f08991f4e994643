"""QLoRA smoke test on a CUDA GPU: a GLM-4-shaped model (random weights, real GLM-4 tokenizer) trains
~30 steps through `glmtune.train.run_training` with method qlora (nf4, double quant, bf16 compute),
the loss falls, and the saved adapter reloads on a fresh 4-bit base with the same logits.

Usage on the GPU machine (bitsandbytes carried as a wheel):
    python bench/qlora_smoke.py [--hidden 1024 --layers 4] [--steps 30] [--tokenizer ../shared/data/glm4-tokenizer]
Prints one JSON line.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

p = argparse.ArgumentParser()
p.add_argument("--hidden", type=int, default=1024)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared/data/glm4-tokenizer"))
args = p.parse_args()

import torch  # noqa: E402

from glmtune.models.tiny import build_tiny_glm4  # noqa: E402
from glmtune.train import load_config, run_training  # noqa: E402

assert torch.cuda.is_available(), "needs CUDA"
work = Path(tempfile.mkdtemp())
model_dir = build_tiny_glm4(work / "model", args.tokenizer, dtype="bfloat16", overrides=dict(
    hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
    num_attention_heads=args.hidden // 128, num_key_value_heads=2, head_dim=128))
data = work / "data.jsonl"
with open(data, "w") as f:
    for i in range(64):
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Intent of call {i}?"},
                                         {"role": "assistant", "content": f"intent {i % 8}"}]}) + "\n")
cfg = load_config({"model": {"path": str(model_dir), "dtype": "bf16"},
                   "data": {"datasets": [str(data)], "cutoff_len": 128, "val_size": 8},
                   "method": {"name": "qlora", "r": 64, "alpha": 128},
                   "train": {"max_steps": args.steps, "batch_size": 4, "lr": 2e-4 * 10, "gradient_checkpointing": True},
                   "output": {"dir": str(work / "out"), "save_every": 10}})
torch.cuda.reset_peak_memory_stats()
t = time.time()
res = run_training(cfg, return_model=True)
secs = time.time() - t
losses = [m["loss"] for m in res.metrics if "loss" in m]

from peft import PeftModel  # noqa: E402
from glmtune.models.loading import load_model  # noqa: E402
from glmtune.models.peft_setup import qlora_quant_config  # noqa: E402

base = load_model(model_dir, dtype="bfloat16", quantization_config=qlora_quant_config(), device_map={"": 0})
reloaded = PeftModel.from_pretrained(base, str(res.adapter_path)).eval()
ids = torch.randint(0, 150000, (1, 32), device="cuda")
with torch.no_grad():
    a = reloaded(input_ids=ids).logits.float()
    b = res.model(input_ids=ids).logits.float()
diff = float((a - b).abs().max())
ok = losses[-1] < losses[0] and diff < 1e-2 * float(b.abs().max())
print(json.dumps(dict(bench="qlora_smoke", ok=ok, steps=res.steps, first_loss=round(losses[0], 4),
                      last_loss=round(losses[-1], 4), eval_loss=res.eval_loss, max_logit_diff=diff,
                      seconds=round(secs, 1), peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      torch=torch.__version__, gpu=torch.cuda.get_device_name())))
sys.exit(0 if ok else 1)
